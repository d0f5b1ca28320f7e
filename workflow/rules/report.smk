rule report:
    """One self-contained HTML report: curves, audit, eval, predictions vs labels, provenance (every
    input it reads is declared here and named in the report with the md5 dvc.lock records for it)."""
    input:
        manifest=rules.manifest.input.manifest,
        **report_inputs(),  # every role of higgs_tune.outputs.REPORT_ROLES, from the rule writing it
    output:
        html=report(output_path("report"), caption="../report/report.rst", category="higgs-tune"),
    params:
        cfg=stage_config(),
        code=rule_code("report"),
        inputs=lambda wc, input: role_args(dict(input.items())),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "report.log",
    shell:
        "python -m higgs_tune.report --config-json {params.cfg:q} {params.inputs}"
        " --html {output.html:q} > {log:q} 2>&1 && echo 'report: {output.html}'"
