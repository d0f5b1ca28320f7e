rule manifest:
    """Read data.manifest (ChatML / LJSpeech / CSV), fix what can be fixed, quarantine the rest."""
    input:
        manifest=config["data"]["manifest"],
    output:
        train=P.train_manifest,
        val=P.val_manifest,
        quarantine=P.quarantine,
        fixes=P.fixes,
    params:
        sig=section_sig("data"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "manifest.log",
    shell:
        "python -m higgs_tune.manifest > {log} 2>&1"
