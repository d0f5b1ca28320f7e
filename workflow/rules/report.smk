rule report:
    """One self-contained HTML report: curves, audit, eval, predictions vs labels, provenance (every
    input it reads is declared here and named with its sha256 in the report)."""
    input:
        manifest=rules.manifest.input.manifest,
        train_manifest=upstream("manifest", "train"),
        val_manifest=upstream("manifest", "val"),
        fixes=upstream("manifest", "fixes"),
        quarantine=upstream("manifest", "quarantine"),
        tokens_index=upstream("tokenize", "index"),
        audit_summary=upstream("audit", "summary"),
        audit_samples=upstream("audit", "samples"),
        metrics=upstream("train", "metrics"),
        val_metrics=upstream("train", "val_metrics"),
        predictions=upstream("train", "predictions"),
        train_state=upstream("train", "state"),
        adapter=upstream("train", "adapter"),
        eval_metrics=upstream("evaluate", "metrics"),
        generated=upstream("evaluate", "generated"),
        audio=upstream("evaluate", "audio"),
        paired=upstream("evaluate", "paired"),
        paired_summary=upstream("evaluate", "paired_summary"),
        base_eval_metrics=upstream("evaluate_base", "metrics"),
        base_generated=upstream("evaluate_base", "generated"),
        base_audio=upstream("evaluate_base", "audio"),
        selection=upstream("select", "selection"),
    output:
        html=report(OUT / "report.html", caption="../report/report.rst", category="higgs-tune"),
    params:
        cfg=stage_config(),
        code=code_sig("report"),
        inputs=lambda wc, input: role_args(dict(input.items())),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "report.log",
    shell:
        "python -m higgs_tune.report --config-json {params.cfg:q} {params.inputs}"
        " --html {output.html:q} > {log:q} 2>&1 && echo 'report: {output.html}'"
