rule audit:
    """Build the exact training tensors and audit the labels; exits non-zero (and training never
    starts) when any rule fails. The profiles keep a failed job's outputs (keep-incomplete), so the
    failed summary stays readable in place."""
    input:
        train=upstream("manifest", "train"),
        val=upstream("manifest", "val"),
        index=upstream("tokenize", "index"),
    output:
        **rule_outputs("audit"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=stage_config("model", "audit", "lora"),
        code=rule_code("audit"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "audit.log",
    benchmark:
        LOGS / "audit.benchmark.tsv"
    shell:
        "python -m higgs_tune.audit --config-json {params.cfg:q} --train {input.train:q} --val {input.val:q}"
        " --index {input.index:q} --summary {output.summary:q} --samples {output.samples:q} > {log:q} 2>&1"
