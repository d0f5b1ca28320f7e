localrules:
    curves,


rule curves:
    """The training curves as CSV tables for `dvc plots` (DVC does not read JSONL): one column per
    scalar, lists as name_0..name_n."""
    input:
        metrics=upstream("train", "metrics"),
        val_metrics=upstream("train", "val_metrics"),
    output:
        **rule_outputs("curves"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        code=rule_code("curves"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "curves.log",
    shell:
        "python -m higgs_tune.curves --metrics {input.metrics:q} --val-metrics {input.val_metrics:q}"
        " --train {output.train:q} --val {output.val:q} > {log:q} 2>&1"
