rule evaluate:
    """Held-out (val split) losses and teacher-forced top-1 accuracy per codebook; generated audio
    for the first eval.generate.n_samples val rows, scored by ASR WER and speaker similarity."""
    input:
        adapter=P.adapter,
        val=P.val_manifest,
        index=P.tokens_index,
    output:
        metrics=P.eval_metrics,
        generated=P.eval_generated,
        audio=directory(P.eval_audio),
    params:
        sig=section_sig("model", "lora", "train", "eval", "audio_tokenizer"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "evaluate.log",
    shell:
        "python -m higgs_tune.evaluate > {log} 2>&1"
