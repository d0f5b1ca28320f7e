rule tokenize:
    """Encode every kept clip once with the Higgs audio tokenizer (content-addressed cache in
    cache_dir, shared by experiments: a cache, not an output)."""
    input:
        train=upstream("manifest", "train"),
        val=upstream("manifest", "val"),
    output:
        index=OUT / "tokens" / "index.parquet",
        stats=OUT / "tokens" / "stats.json",
    params:
        cfg=stage_config("audio_tokenizer", "cache_dir"),
        code=code_sig("tokenize"),
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
        "python -m higgs_tune.tokenize --config-json {params.cfg:q} --train {input.train:q} --val {input.val:q}"
        " --index {output.index:q} --stats {output.stats:q} --threads {threads} > {log:q} 2>&1"
