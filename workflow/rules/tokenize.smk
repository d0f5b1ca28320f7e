rule tokenize:
    """Encode every kept clip once with the Higgs audio tokenizer (content-addressed cache)."""
    input:
        train=P.train_manifest,
        val=P.val_manifest,
    output:
        index=P.tokens_index,
    params:
        sig=section_sig("audio_tokenizer", "cache_dir"),
    threads: 2
    resources:
        mem_mb=8000,
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "tokenize.log",
    benchmark:
        LOGS / "tokenize.benchmark.tsv"
    shell:
        "python -m higgs_tune.tokenize --threads {threads} > {log} 2>&1"
