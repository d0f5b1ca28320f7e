rule capture:
    output: "step.env"
    resources: nodes=2, gres="gpu:1", slurm_partition="gpu", mem_mb=500, cpus_per_task=2, runtime=5
    shell:
        "env | grep -E '^(SLURM_|CUDA_VISIBLE_DEVICES=)' | sort > {output};"
        " scontrol show job --oneliner $SLURM_JOB_ID > scontrol-show-job.txt;"
        " scontrol show hostnames $(sed -n 's/.* NodeList=\\([^ ]*\\) .*/\\1/p' scontrol-show-job.txt) > scontrol-show-hostnames.txt;"
        " scontrol show node --oneliner $(head -1 scontrol-show-hostnames.txt) > scontrol-show-node.txt"
