rule export_model:
    """The selected checkpoint's LoRA (eval/selection.json: the final adapter or a train/steps
    snapshot) merged into the base model (and the trained modules_to_save written in), in the base
    checkpoint's layout: HiggsAudioModel.from_pretrained(results/{experiment}/merged) loads it without
    peft; merged/higgs_tune_export.json names the step. A full copy of the model (3B: ~12 GB in bf16),
    so NOT in the default target: ask for it, `snakemake ... export` (or the folder's path)."""
    input:
        selection=upstream("select", "selection"),
        steps=upstream("train", "steps"),
        adapter=upstream("train", "adapter"),
    output:
        **rule_outputs("export_model"),  # names and paths: workflow/higgs_tune/outputs.py
    params:
        cfg=stage_config("model"),
        code=rule_code("export_model"),
    resources:
        mem_mb=8000,
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "export.log",
    shell:
        "python -m higgs_tune.export --config-json {params.cfg:q} --selection {input.selection:q}"
        " --steps {input.steps:q} --adapter {input.adapter:q} --merged {output.merged:q} > {log:q} 2>&1"


rule export:
    """Target: the merged model of every experiment the default target reports on."""
    input:
        expand(rules.export_model.output.merged, experiment=TARGET_EXPERIMENTS),
