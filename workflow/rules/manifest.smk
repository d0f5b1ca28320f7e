rule manifest:
    """Read data.manifest (ChatML / LJSpeech / CSV / train-higgs-audio / ms-swift / raw JSONL), fix what can be fixed, quarantine the rest."""
    input:
        manifest=lambda wc: experiment_config(wc)["data"]["manifest"],
    output:
        **rule_outputs("manifest"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=stage_config("data", "cache_dir"),
        code=rule_code("manifest"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "manifest.log",
    shell:
        "python -m higgs_tune.manifest --config-json {params.cfg:q} --manifest {input.manifest:q}"
        " --train {output.train:q} --val {output.val:q} --quarantine {output.quarantine:q}"
        " --fixes {output.fixes:q} > {log:q} 2>&1"
