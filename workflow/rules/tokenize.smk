# audio_tokenizer.shards: 1 -> one `tokenize` job; N > 1 -> N `tokenize_shard` jobs (a share of the
# clips each, balanced by audio, into the shared cache) and one `tokenize_gather` writing the same
# index. Each experiment takes one of the two (wildcard constraints; TOKENIZE_ONE_JOB in common.smk),
# so `upstream("tokenize", "index")` is the index either way.
rule tokenize:
    """Encode every kept clip once with the Higgs audio tokenizer (content-addressed cache in
    cache_dir, shared by experiments: a cache, not an output)."""
    input:
        train=upstream("manifest", "train"),
        val=upstream("manifest", "val"),
    output:
        **rule_outputs("tokenize"),  # names and paths: workflow/higgs_tune/outputs.py
    wildcard_constraints:
        experiment=experiments_matching(TOKENIZE_ONE_JOB),
    params:
        cfg=stage_config("audio_tokenizer", "cache_dir"),
        code=rule_code("tokenize"),
    threads: 2
    resources:
        mem_mb=8000,
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "tokenize.log",
    benchmark:
        LOGS / "tokenize.benchmark.tsv"
    shell:
        "python -m higgs_tune.audio_tokens encode --config-json {params.cfg:q} --train {input.train:q}"
        " --val {input.val:q} --index {output.index:q} --stats {output.stats:q} --threads {threads} > {log:q} 2>&1"


rule tokenize_shard:
    """Encode one shard of the kept clips (audio_tokenizer.shards > 1: a share of the distinct clips,
    balanced by audio) into the shared cache; write that shard's index rows and stats (resumable: a
    rerun encodes what the cache lacks)."""
    input:
        train=upstream("manifest", "train"),
        val=upstream("manifest", "val"),
    output:
        **rule_outputs("tokenize_shard"),  # names and paths: workflow/higgs_tune/outputs.py
    wildcard_constraints:
        experiment=experiments_matching(TOKENIZE_SHARDED),
        shard=r"\d+",
        nshards=r"\d+",
    params:
        cfg=stage_config("audio_tokenizer", "cache_dir"),
        code=rule_code("tokenize_shard"),
        shard=shard_arg,
    threads: 2
    resources:
        mem_mb=8000,
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "tokenize_shard" / "{shard}-of-{nshards}.log",
    benchmark:
        LOGS / "tokenize_shard" / "{shard}-of-{nshards}.benchmark.tsv"
    shell:
        "python -m higgs_tune.audio_tokens encode --config-json {params.cfg:q} --train {input.train:q}"
        " --val {input.val:q} --shard {params.shard} --index {output.index:q} --stats {output.stats:q} --threads {threads}"
        " > {log:q} 2>&1"


rule tokenize_gather:
    """Join the shards' index rows into the index one tokenize job writes (same rows, order and
    codes) and stats.json totalled over the shards; opens no audio."""
    input:
        train=upstream("manifest", "train"),
        val=upstream("manifest", "val"),
        shard_index=shard_outputs("index"),
        shard_stats=shard_outputs("stats"),
    output:
        **rule_outputs("tokenize_gather"),  # names and paths: workflow/higgs_tune/outputs.py
    wildcard_constraints:
        experiment=experiments_matching(TOKENIZE_SHARDED),
    params:
        code=rule_code("tokenize_gather"),
    conda:
        "../../envs/higgs-tune.yaml"
    log:
        LOGS / "tokenize_gather.log",
    shell:
        "python -m higgs_tune.audio_tokens gather --train {input.train:q} --val {input.val:q}"
        " --shard-index {input.shard_index:q} --shard-stats {input.shard_stats:q}"
        " --index {output.index:q} --stats {output.stats:q} > {log:q} 2>&1"
