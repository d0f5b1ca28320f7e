rule train:
    """LoRA fine-tuning with accelerate; starts only after a passed audit. Resume checkpoints live
    in train.resume_dir/{experiment} (resume_dir), outside the declared outputs, so that a rerun of
    this job (which first deletes its outputs) resumes instead of starting again."""
    input:
        audit=upstream("audit", "summary"),
        train=upstream("manifest", "train"),
        val=upstream("manifest", "val"),
        index=upstream("tokenize", "index"),
        accelerate="config/accelerate.yaml",
    output:
        **rule_outputs("train"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=train_config,
        monitor=train_monitor_config,
        code=rule_code("train"),
        resume_dir=resume_dir,
        nproc=lambda wc, resources: processes_per_node(resources, experiment_config(wc)),
    threads: 2
    resources:
        mem_mb=16000,
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "train.log",
    benchmark:
        LOGS / "train.benchmark.tsv"
    shell:
        # exec: the launcher replaces the job's shell, so a signal to every process of the Slurm step
        # finds no bash to kill first (README: Preemption)
        "exec python -m higgs_tune.launch --processes-per-node {params.nproc} --config-file {input.accelerate:q} --"
        " --config-json {params.cfg:q} --monitor-json {params.monitor:q}"
        " --audit {input.audit:q} --train {input.train:q} --val {input.val:q} --index {input.index:q}"
        " --metrics {output.metrics:q} --val-metrics {output.val_metrics:q} --predictions {output.predictions:q}"
        " --adapter {output.adapter:q} --checkpoint {output.checkpoint:q} --state {output.state:q}"
        " --tensorboard {output.tensorboard:q} --steps {output.steps:q} --resume-dir {params.resume_dir:q}"
        " > {log:q} 2>&1"
