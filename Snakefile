# higgs-tune: LoRA fine-tuning of Higgs Audio v2 with a label audit gate.
#   local demo:  snakemake --profile profiles/default --configfile config/demo.yaml
#   cluster:     snakemake --profile profiles/slurm --configfile config/cluster.yaml
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
include: "workflow/rules/curves.smk"


rule all:
    input:
        rules.report.output,
        rules.curves.output,
    default_target: True
