rule report:
    """One self-contained HTML report: curves, audit, eval, predictions vs labels, provenance."""
    input:
        metrics=P.metrics,
        predictions=P.predictions,
        audit=P.audit_summary,
        eval=P.eval_metrics,
        generated=P.eval_generated,
        audio=P.eval_audio,
        fixes=P.fixes,
    output:
        report(P.report, caption="../report/report.rst", category="higgs-tune"),
    params:
        sig=section_sig("report", "experiment"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "report.log",
    shell:
        "python -m higgs_tune.report > {log} 2>&1 && echo 'report: {output}'"
