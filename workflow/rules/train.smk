rule train:
    """LoRA fine-tuning with accelerate; starts only after a passed audit."""
    input:
        audit=P.audit_summary,
        train=P.train_manifest,
        val=P.val_manifest,
        index=P.tokens_index,
    output:
        metrics=P.metrics,
        predictions=P.predictions,
        adapter=directory(P.adapter),
        state=P.train_state,
    params:
        sig=section_sig("model", "lora", "train"),
        nproc=lambda wc, resources: max(1, int(resources.get("gpu", 0) or 0)),
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
        "accelerate launch --num_processes {params.nproc} --num_machines 1 --mixed_precision no "
        "--dynamo_backend no -m higgs_tune.train > {log} 2>&1"
