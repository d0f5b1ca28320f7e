# higgs-tune: LoRA fine-tuning of Higgs Audio v2 with a label audit gate.
#   local demo:  snakemake --profile profiles/default --configfile config/demo.yaml
#   cluster:     snakemake --profile profiles/slurm --configfile config/cluster.yaml [my_data.yaml]
#   merged model (not in the default target): snakemake export --profile ... --configfile ...
#   a sweep:     add my_sweep.yaml declaring `sweep:` to --configfile (README: Runs compared)
from snakemake.utils import min_version

min_version("8.0")


configfile: "config/demo.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/audit.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/export.smk"
include: "workflow/rules/compare.smk"
include: "workflow/rules/curves.smk"


rule all:
    """The experiment's report; with a `sweep:`, each run's report and the comparison."""
    input:
        expand(rules.report.output[0], experiment=TARGET_EXPERIMENTS),
        expand(rules.curves.output.train, experiment=TARGET_EXPERIMENTS),
        expand(rules.compare.output[0], sweep=[SWEEP["name"]] if SWEEP else []),
    default_target: True
