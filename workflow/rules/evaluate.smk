rule evaluate:
    """Held-out (val split) losses and teacher-forced top-1 accuracy per codebook; generated audio
    for the first eval.generate.n_samples val rows, scored by ASR WER, speaker similarity and DNSMOS."""
    input:
        adapter=upstream("train", "adapter"),
        val=upstream("manifest", "val"),
        index=upstream("tokenize", "index"),
    output:
        metrics=OUT / "eval" / "metrics.json",
        generated=OUT / "eval" / "generated.jsonl",
        audio=directory(OUT / "eval" / "audio"),
    params:
        cfg=stage_config("model", "lora", "train", "eval", "audio_tokenizer"),
        code=code_sig("evaluate"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "evaluate.log",
    shell:
        "python -m higgs_tune.evaluate --config-json {params.cfg:q} --adapter {input.adapter:q} --val {input.val:q}"
        " --index {input.index:q} --metrics {output.metrics:q} --generated {output.generated:q}"
        " --audio {output.audio:q} > {log:q} 2>&1"
