rule evaluate_base:
    """The base model alone (no adapter): the same eval.generate prompts, seeds and sampling as
    `evaluate`, scored the same way (without the ground-truth/codec calibration rows, which
    `evaluate` has, and without val losses). Its config sections and upstream
    stages name no training setting, so every run of a sweep that shares the base model, val set and
    eval settings reads the base experiment's copy (stage_owner): generated once."""
    input:
        val=upstream("manifest", "val"),
        index=upstream("tokenize", "index"),
    output:
        **rule_outputs("evaluate_base"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=stage_config("data", "model", "eval", "audio_tokenizer", drop=EVAL_CHOICE_KEYS),
        code=rule_code("evaluate_base"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "evaluate_base.log",
    shell:
        "python -m higgs_tune.evaluate_base --config-json {params.cfg:q} --val {input.val:q}"
        " --index {input.index:q} --metrics {output.metrics:q} --generated {output.generated:q}"
        " --audio {output.audio:q} > {log:q} 2>&1"


rule evaluate:
    """Held-out (val split) losses and teacher-forced top-1 accuracy per codebook; generated audio
    for the first eval.generate.n_samples val rows, scored by ASR WER/CER, speaker similarity and
    DNSMOS, and paired with the base model's rows (evaluate_base): per-sample differences and their
    mean with a bootstrap 95 % CI (eval/paired.jsonl, eval/paired.json)."""
    input:
        adapter=upstream("train", "adapter"),
        val=upstream("manifest", "val"),
        index=upstream("tokenize", "index"),
        base_generated=upstream("evaluate_base", "generated"),
    output:
        **rule_outputs("evaluate"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=stage_config("data", "model", "lora", "train", "eval", "audio_tokenizer", drop=EVAL_CHOICE_KEYS),
        code=rule_code("evaluate"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "evaluate.log",
    shell:
        "python -m higgs_tune.evaluate --config-json {params.cfg:q} --adapter {input.adapter:q} --val {input.val:q}"
        " --index {input.index:q} --base-generated {input.base_generated:q} --metrics {output.metrics:q}"
        " --generated {output.generated:q} --audio {output.audio:q} --paired {output.paired:q}"
        " --paired-summary {output.paired_summary:q} > {log:q} 2>&1"


rule evaluate_step:
    """One saved checkpoint of eval.checkpoints, scored as `evaluate` scores the final adapter (val
    losses, generations, the pairing with the base model's rows): the adapter snapshot of step
    {step} (train/steps/step-XXXXXXXX). One job per step (in parallel on Slurm). A step the run never
    saved (it stopped before, or train.save_interval changed after training) writes metrics that
    say skipped, and the selection passes it over."""
    wildcard_constraints:
        step="[0-9]+",
    input:
        steps=upstream("train", "steps"),
        val=upstream("manifest", "val"),
        index=upstream("tokenize", "index"),
        base_generated=upstream("evaluate_base", "generated"),
    output:
        **rule_outputs("evaluate_step"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=stage_config("data", "model", "lora", "train", "eval", "audio_tokenizer", drop=EVAL_CHOICE_KEYS),
        code=rule_code("evaluate_step"),
        adapter=lambda wc, input: f"{input.steps}/step-{int(wc.step):08d}",
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "evaluate_step-{step}.log",
    shell:
        "python -m higgs_tune.evaluate --config-json {params.cfg:q} --adapter {params.adapter:q} --step {wildcards.step}"
        " --val {input.val:q} --index {input.index:q} --base-generated {input.base_generated:q}"
        " --metrics {output.metrics:q} --generated {output.generated:q} --audio {output.audio:q}"
        " --paired {output.paired:q} --paired-summary {output.paired_summary:q} > {log:q} 2>&1"


rule select:
    """The checkpoint to ship (eval/selection.json; `export` merges it): the final adapter and every
    eval.checkpoints step ranked by eval.select (default: the lowest val loss; ties: the earliest
    step), with the reason in words and every step's scores for the report."""
    input:
        final=upstream("evaluate", "metrics"),
        state=upstream("train", "state"),
        steps=step_metrics,
    output:
        **rule_outputs("select"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=select_config,
        code=rule_code("select"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "select.log",
    shell:
        "python -m higgs_tune.select --config-json {params.cfg:q} --final {input.final:q} --state {input.state:q}"
        " --steps {input.steps:q} --selection {output.selection:q} > {log:q} 2>&1"
