rule audit:
    """Build the exact training tensors and audit the labels; exits non-zero (and training never
    starts) when any rule fails. Snakemake removes the outputs of a failed job: the failed summary
    stays readable at results/{experiment}/logs/audit_summary.json."""
    input:
        train=P.train_manifest,
        val=P.val_manifest,
        index=P.tokens_index,
    output:
        summary=P.audit_summary,
        samples=P.audit_samples,
    params:
        sig=section_sig("model", "audit", "lora"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "audit.log",
    benchmark:
        LOGS / "audit.benchmark.tsv"
    shell:
        "python -m higgs_tune.audit > {log} 2>&1"
