"""Export: the trained LoRA merged into the base model, as a standalone Higgs Audio v2 checkpoint.

CLI (rule ``export``, ``workflow/rules/export.smk``; not part of the default target):
``python -m higgs_tune.export --config-json JSON [--selection results/X/eval/selection.json --steps
results/X/train/steps] --adapter results/X/train/adapter --out results/X/merged``

With ``--selection`` (what the rule passes) the checkpoint it selected is merged
(:func:`higgs_tune.select.adapter_of`: ``--adapter``, the final one, or the snapshot
``--steps/step-XXXXXXXX``); without it, ``--adapter``.

The base model (config ``model`` section) is loaded in float32 on the CPU, the adapter applied
(``PeftModel.from_pretrained``) and merged (``merge_and_unload(safe_merge=True)``: each LoRA delta
``B @ A * alpha / r`` added to its base weight; each ``modules_to_save`` module, e.g. ``audio_lm_head``,
replaced by its trained copy), then cast once to the output dtype and written in the base
checkpoint's own layout, so that upstream ``HiggsAudioModel.from_pretrained(out)`` (as
``HiggsAudioServeEngine`` calls it) loads it with no peft and no higgs-tune:

* ``config.json``, ``generation_config.json`` (``save_pretrained``: the base's generation config);
* the weights: when the base is sharded (``model.safetensors.index.json``), the same shard files
  holding the same tensors as the base's index says, and that index (with the merged
  ``total_size``); else ``model.safetensors`` (``save_pretrained``, 5 GB shards);
* the text tokenizer (``model.text_tokenizer``, checked to carry the Higgs tokens): a folder's
  tokenizer files copied as they are (``tokenizer.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``, and ``tokenizer.model`` / ``vocab.json`` / ``merges.txt`` /
  ``added_tokens.json`` where present); the bundled tokenizer or a hub id written by ``save_pretrained``;
* ``higgs_tune_export.json``, written last (its presence says the folder is complete): base,
  adapter (sha256 of its weights), ``step`` (the optimizer step of that adapter, with ``--selection``)
  and ``selection`` (why it was selected), dtype, git revision.

Output dtype: the base checkpoint's ``torch_dtype`` (``config.json``) for ``source: pretrained``, else
``model.dtype``. Merging in float32 and rounding once keeps the merged weights as close to base +
adapter as that dtype allows. Memory: one float32 copy of the model (3B Higgs: ~23 GB of RAM).
``out`` is emptied first; in the workflow Snakemake marks it incomplete until the job succeeds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .config import config_from_args
from .fileio import git_revision, sha256_file, write_json
from .stage_cli import stage_parser

log = logging.getLogger("higgs_tune.export")


def base_folder(model_cfg: dict[str, Any]) -> Path | None:
    """The base checkpoint's local folder (``model.path``, or its hub snapshot from the cache); ``None``
    for ``source: random_init`` (no checkpoint)."""
    if model_cfg["source"] != "pretrained":
        return None
    path = model_cfg["path"]
    if os.path.isdir(path):
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json"]))


def output_dtype(model_cfg: dict[str, Any], base: Path | None) -> torch.dtype:
    """The base checkpoint's ``torch_dtype`` (its ``config.json``), else ``model.dtype``."""
    name = model_cfg["dtype"]
    if base is not None and (base / "config.json").is_file():
        name = json.loads((base / "config.json").read_text()).get("torch_dtype") or name
    return getattr(torch, name)


def base_weight_map(base: Path | None) -> dict[str, str] | None:
    """``tensor name -> shard file`` of a sharded base (its ``model.safetensors.index.json``), else ``None``."""
    if base is None or not (base / "model.safetensors.index.json").is_file():
        return None
    return dict(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])


def save_merged(model, out: Path, weight_map: dict[str, str] | None) -> None:
    """Write ``model`` (config, generation config, weights) to ``out`` in the base's layout.

    With ``weight_map`` (and the same tensor names as the model's ``state_dict``) each shard file of the
    base gets the same tensors, plus the index; otherwise ``save_pretrained`` lays the weights out.
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    if weight_map is None or set(weight_map) != set(state):
        if weight_map is not None:
            log.warning("the base index names other tensors than the merged model (%d vs %d): transformers' "
                        "default sharding", len(weight_map), len(state))
        model.save_pretrained(out, safe_serialization=True)
        return
    out.mkdir(parents=True, exist_ok=True)
    # the config as save_pretrained writes it (transformers 4.46 modeling_utils.save_pretrained)
    model.config.torch_dtype = str(next(model.parameters()).dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config._attn_implementation_autoset = False
    model.config.save_pretrained(out)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    seen: set[int] = set()
    for name, shard in weight_map.items():
        t = state[name].detach().contiguous()
        if t.data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.data_ptr())
        shards.setdefault(shard, {})[name] = t
    for shard, tensors in shards.items():
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def save_text_tokenizer(name_or_path: str, out: Path) -> None:
    """The text tokenizer into ``out``: a folder's :data:`TOKENIZER_FILES` copied byte for byte, else
    (``llama3.2-bundled``, a hub id) ``save_pretrained``. Loaded first either way
    (:func:`higgs_tune.model.load_text_tokenizer`: it must carry the Higgs tokens at their ids).
    """
    from .model import load_text_tokenizer

    tok = load_text_tokenizer(name_or_path)
    if name_or_path and os.path.isdir(name_or_path):
        for name in TOKENIZER_FILES:
            if (Path(name_or_path) / name).is_file():
                shutil.copyfile(Path(name_or_path) / name, out / name)
    else:
        tok.save_pretrained(out)


def merge_adapter(model_cfg: dict[str, Any], adapter: str | Path):
    """Base (float32, on the CPU) + the LoRA adapter in ``adapter``, merged: a plain ``HiggsAudioModel``.

    Raises:
        FileNotFoundError: ``adapter`` lacks ``adapter_config.json``.
        ValueError: a merged weight is not finite (peft ``safe_merge``).
    """
    from peft import PeftModel

    from .model import build_model, device_and_dtype

    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter}: no adapter_config.json; give the train stage's adapter folder "
                                f"(results/<experiment>/train/adapter)")
    # a random_init base is drawn on the device training drew it on (the CUDA and CPU RNGs differ)
    device = device_and_dtype(model_cfg["device"], model_cfg["dtype"])[0] if model_cfg["source"] == "random_init" \
        else "cpu"
    base = build_model(model_cfg, torch.float32, device=device).to("cpu")
    peft_model = PeftModel.from_pretrained(base, str(adapter))
    return peft_model.merge_and_unload(safe_merge=True).eval()


def export(cfg: dict[str, Any], *, adapter: str | Path, out: str | Path, selection: dict | None = None) -> Path:
    """Write the merged model to ``out`` (see the module docstring); returns ``out``.

    Args:
        cfg: config with the ``model`` section (base ``source``/``path``/``dtype``, ``text_tokenizer``).
        adapter: the adapter folder to merge (the train stage's, or a train/steps snapshot).
        out: the output folder (replaced when it exists).
        selection: ``eval/selection.json`` of the select stage, when ``adapter`` is its choice: its
            step and reason are recorded in ``higgs_tune_export.json``.

    Raises:
        FileNotFoundError: ``adapter`` lacks ``adapter_config.json``.
        ValueError: a merged weight is not finite.
    """
    out = Path(out)
    model_cfg = cfg["model"]
    base = base_folder(model_cfg)
    dtype = output_dtype(model_cfg, base)
    merged = merge_adapter(model_cfg, adapter).to(dtype)
    shutil.rmtree(out, ignore_errors=True)
    save_merged(merged, out, base_weight_map(base))
    save_text_tokenizer(model_cfg["text_tokenizer"], out)
    weights = sorted(Path(adapter).glob("adapter_model.*"))
    pretrained = model_cfg["source"] == "pretrained"
    write_json(out / "higgs_tune_export.json", {
        "base": model_cfg["path"] if pretrained else f"random_init seed {model_cfg['seed']}",
        "adapter": str(adapter), "adapter_sha256": {w.name: sha256_file(w) for w in weights},
        **({"step": selection["selected_step"], "selection": selection["reason"]} if selection else {}),
        "dtype": str(dtype).removeprefix("torch."), "text_tokenizer": model_cfg["text_tokenizer"],
        "git_revision": git_revision(),
    })
    umask = os.umask(0)
    os.umask(umask)
    for f in out.iterdir():  # safetensors writes 0600; results are shared (cluster groups), as fileio's files
        if f.is_file():
            f.chmod(0o666 & ~umask)
    n = sum(p.numel() for p in merged.parameters())
    log.info("merged %s into the base: %d parameters (%s) in %s", adapter, n, dtype, out)
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    parser = stage_parser(
        "python -m higgs_tune.export", __doc__.splitlines()[0],
        inputs={"adapter": "the trained LoRA adapter folder (the final one)",
                "selection": {"required": False, "help": "eval/selection.json: merge the checkpoint it selected"},
                "steps": {"required": False, "help": "train/steps, the adapter snapshots (with --selection)"}},
        outputs={"merged": "the merged model folder"})
    args = parser.parse_args(argv)
    if args.selection and not args.steps:
        parser.error("--selection needs --steps (the train stage's adapter snapshots)")
    selection, adapter = None, args.adapter
    if args.selection:
        from .select import adapter_of

        selection = json.loads(Path(args.selection).read_text())
        adapter = adapter_of(selection, args.adapter, args.steps)
        log.info("merging step %d (%s): %s", selection["selected_step"], selection["reason"], adapter)
    export(config_from_args(args), adapter=adapter, out=args.merged, selection=selection)


if __name__ == "__main__":
    main()
