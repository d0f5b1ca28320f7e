rule compare:
    """One self-contained HTML comparing the runs of a sweep: train/val loss, per-codebook curves and
    eval scores overlaid, each run's lineage (DVC md5 of its inputs, sha256 of config sections, code) and the
    config keys that differ between runs."""
    input:
        lambda wc: sorted({p for roles in sweep_inputs(wc).values() for p in roles.values()}),
    output:
        html=report(RESULTS / "compare-{sweep}.html", caption="../report/compare.rst", category="higgs-tune"),
    params:
        cfg=sweep_config,
        code=rule_code("compare"),
        inputs=lambda wc: " ".join(role_args(dict(sorted(roles.items())), f"{exp}:")
                                   for exp, roles in sorted(sweep_inputs(wc).items())),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        RESULTS / "compare-{sweep}.log",
    shell:
        "python -m higgs_tune.compare --config-json {params.cfg:q} {params.inputs}"
        " --html {output.html:q} > {log:q} 2>&1 && echo 'compare: {output.html}'"
