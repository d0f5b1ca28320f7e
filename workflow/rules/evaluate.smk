rule evaluate:
    """Held-out (val split) losses and teacher-forced top-1 accuracy per codebook."""
    input:
        adapter=P.adapter,
        val=P.val_manifest,
        index=P.tokens_index,
    output:
        metrics=P.eval_metrics,
    params:
        sig=section_sig("model", "lora", "train", "eval"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "evaluate.log",
    shell:
        "python -m higgs_tune.evaluate > {log} 2>&1"
