rule report:
    """One self-contained HTML report: curves, audit, eval, predictions vs labels, provenance (every
    input it reads is declared here and named with its sha256 in the report)."""
    input:
        manifest=rules.manifest.input.manifest,
        train_manifest=rules.manifest.output.train,
        val_manifest=rules.manifest.output.val,
        fixes=rules.manifest.output.fixes,
        quarantine=rules.manifest.output.quarantine,
        tokens_index=rules.tokenize.output.index,
        audit_summary=rules.audit.output.summary,
        audit_samples=rules.audit.output.samples,
        metrics=rules.train.output.metrics,
        val_metrics=rules.train.output.val_metrics,
        predictions=rules.train.output.predictions,
        train_state=rules.train.output.state,
        adapter=rules.train.output.adapter,
        eval_metrics=rules.evaluate.output.metrics,
        generated=rules.evaluate.output.generated,
        audio=rules.evaluate.output.audio,
    output:
        report(OUT / "report.html", caption="../report/report.rst", category="higgs-tune"),
    params:
        cfg=stage_config(*sorted(config)),
        code=code_sig("report"),
        inputs=lambda wc, input: json.dumps(dict(input.items())),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "report.log",
    shell:
        "python -m higgs_tune.report --config-json {params.cfg:q} --inputs {params.inputs:q}"
        " --out {output:q} > {log:q} 2>&1 && echo 'report: {output}'"
