"""The stage run: read, normalize, probe, split, build cloning pairs, write the four outputs; the CLI."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..fileio import write_json, write_jsonl
from ..stage_cli import stage_parser
from .audio import data_root, extract_raw_audio, probe_audio, resolve_audio_path
from .chatml import audio_refs, canonical_json, add_fix, carry_language, normalize_structure, resolve_id
from .cloning import build_cloning
from .readers import detect_format, input_digest, manifest_folder, read_rows
from .rows import ManifestError, QuarantineTooLarge, Reject, SILENCE_PEAK, SourceRow
from .split import assign_splits, split_groups, split_summary

log = logging.getLogger("higgs_tune.manifest")


def _quarantine_entry(src: SourceRow, rej: Reject) -> dict:
    entry: dict[str, Any] = {"line": src.line, "reason": rej.reason, "message": rej.message}
    if rej.field:
        entry["field"] = rej.field
    if src.text is not None:
        entry["text"] = src.text
    else:
        entry["row"] = src.original
    return entry

def run_manifest(cfg: dict[str, Any], *, train_out: str | Path, val_out: str | Path, quarantine_out: str | Path,
                 fixes_out: str | Path, manifest: str | Path | None = None) -> dict[str, Any]:
    """Run the stage; write the four outputs (kept train/val rows, quarantine JSONL, ``fixes.json``).

    Args:
        cfg: config with the ``data`` section (and ``cache_dir``: base64 ``raw_audio`` is extracted
            to ``{cache_dir}/raw_audio``).
        train_out, val_out, quarantine_out, fixes_out: output paths (the manifest rule's outputs).
        manifest: the input manifest; default ``data.manifest``.

    Returns:
        The ``fixes.json`` dict: ``rows_in``, ``rows_kept``, ``rows_quarantined``, ``rows_train``,
        ``rows_val``, ``fixes`` / ``warnings`` / ``reasons`` (kind -> count), ``split_by`` (``"clip"``
        or ``"speaker"``) and ``split`` (:func:`split_summary`), ``format``, ``input``, ``input_sha256``.

    Raises:
        FileNotFoundError: ``data.manifest`` does not exist.
        ManifestError: the input as a whole is unusable, no row survives, or ``data.split_by`` is
            ``speaker`` while the rows name fewer than two speakers.
        QuarantineTooLarge: quarantined / rows_in > ``data.max_quarantine_fraction`` (after writing).
        RuntimeError: rows_in != kept + quarantined (a bug; never expected).
    """
    data = cfg["data"]
    cache = Path(cfg["cache_dir"])
    quarantine_out = Path(quarantine_out)
    manifest = Path(manifest or data["manifest"])
    if not manifest.exists():
        raise FileNotFoundError(f"data.manifest {manifest} does not exist")
    manifest_dir = manifest_folder(manifest)
    root = data_root(data)
    fmt = detect_format(manifest, data["format"])
    min_s, max_s = float(data["min_duration_s"]), float(data["max_duration_s"])
    log.info("reading %s as %s (data_root %s)", manifest, fmt, root or "not set: paths not confined")
    rows = read_rows(manifest, fmt)

    # 1. structure, text, roles; audio paths resolved, raw_audio extracted
    live: list[tuple[SourceRow, dict, list[tuple[str, dict, str]]]] = []
    quarantine: list[dict] = []
    probes: dict[str, dict] = {}
    raw_done: dict[str, tuple[str, dict]] = {}
    for src in rows:
        try:
            if src.error:
                raise src.error
            sample = normalize_structure(src.sample, src.fixes)
            sample["misc"]["id"] = resolve_id(sample, src.original, src.fixes)
            carry_language(sample)
            refs = []
            for where, item in audio_refs(sample):
                if item.get("raw_audio") is not None:
                    b64 = item.pop("raw_audio")
                    key = hashlib.sha256(b64.encode()).hexdigest()
                    if key not in raw_done:  # the same inline bytes in several rows: decoded once
                        raw_done[key] = extract_raw_audio(b64, cache, where)
                    path, probe = raw_done[key]
                    probes[os.path.realpath(path)] = probe
                    add_fix(src.fixes, "raw_audio_extracted", where, f"-> {path}")
                else:
                    path = resolve_audio_path(item["audio_url"], manifest_dir, root, src.fixes, where)
                item["audio_url"] = path
                item.pop("offset", None)
                refs.append((where, item, os.path.realpath(path)))
            live.append((src, sample, refs))
        except Reject as rej:
            quarantine.append(_quarantine_entry(src, rej))

    # 2. decode each distinct file once (threads: libsndfile and hashlib release the GIL)
    todo = sorted({real for _, _, refs in live for _, _, real in refs} - set(probes))
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        probes.update(zip(todo, pool.map(probe_audio, todo)))
    log.info("decoded %d distinct audio files", len(todo))

    # 3. audio checks; ids
    checked: list[tuple[SourceRow, dict]] = []
    for src, sample, refs in live:
        try:
            sha, info, warnings = {}, {}, []
            for where, item, real in refs:
                probe = probes[real]
                if "reason" in probe:
                    raise Reject(probe["reason"], f"{where}: {probe['message']}", field=where)
                dur = probe["duration_s"]
                if not min_s <= dur <= max_s:
                    raise Reject("duration_out_of_range", f"{where}: {item['audio_url']} lasts {dur:.3f} s, outside "
                                 f"[data.min_duration_s={min_s}, data.max_duration_s={max_s}]; trim/split the clip or "
                                 "change the limits", field=where)
                given = item.get("duration")
                if given is None:
                    add_fix(src.fixes, "duration_measured", where, f"{dur:.6f} s")
                elif abs(float(given) - dur) > max(0.05, 0.01 * dur):
                    add_fix(src.fixes, "duration_corrected", where, f"{given} -> {dur:.6f} s")
                item["duration"] = dur
                url = item["audio_url"]
                sha[url] = probe["sha256"]
                info[url] = {"duration_s": dur, "sample_rate": probe["sample_rate"], "channels": probe["channels"]}
                if probe["peak"] < SILENCE_PEAK and "silent_audio" not in warnings:
                    warnings.append("silent_audio")
            sample["misc"].update(audio_sha256=sha, audio_info=info, source_line=src.line)
            if warnings:
                sample["misc"]["warnings"] = warnings
            checked.append((src, sample))
        except Reject as rej:
            quarantine.append(_quarantine_entry(src, rej))

    # 4. duplicates: same id + same content -> dropped (quarantined); same id, other content -> renamed
    all_ids = {s["misc"]["id"] for _, s in checked}
    seen: dict[str, dict[str, int]] = {}  # id -> {content key -> first line}, in reading order
    next_suffix: dict[str, int] = {}
    kept: list[dict] = []
    for src, sample in checked:
        sid = sample["misc"]["id"]
        key = canonical_json({k: v for k, v in sample.items() if k != "misc"})
        earlier = seen.setdefault(sid, {})
        dup = earlier.get(key)
        if dup is not None:
            quarantine.append(_quarantine_entry(src, Reject(
                "duplicate", f"exact duplicate of line {dup} (id {sid!r}); dropped, nothing lost: delete the repeat")))
            continue
        if earlier:
            n = next_suffix.get(sid, 2)  # ids only join all_ids, so the first free suffix never moves back
            while f"{sid}~{n}" in all_ids:
                n += 1
            next_suffix[sid] = n + 1
            new = f"{sid}~{n}"
            all_ids.add(new)
            first_line = next(iter(earlier.values()))
            add_fix(src.fixes, "duplicate_id_renamed", "misc.id", f"{sid!r} (also line {first_line}) -> {new!r}")
            sample["misc"]["id"] = new
        earlier.setdefault(key, src.line)
        sample["misc"]["fixes"] = src.fixes
        kept.append(sample)

    # 5. split by connected clips (or speakers), write, check
    val_fraction = float(data["val_fraction"])
    split_by, groups, split_reason = split_groups(kept, str(data["split_by"]))
    split = assign_splits({k: len(v) for k, v in groups.items()}, val_fraction, int(data["split_seed"]))
    for key, idx in groups.items():
        for i in idx:
            kept[i]["misc"]["split"] = split[key]
    out_rows, cloning_record = kept, None
    if data["cloning"]["enabled"]:  # pairs within each side, after the split: nothing crosses it
        built, targets, cloning_record = build_cloning(kept, data["cloning"])
        keep_tts = data["cloning"]["keep_tts"]
        out_rows = [s for i, s in enumerate(kept) if keep_tts or i not in targets] + built
        cloning_record["tts_replaced"] = 0 if keep_tts else len(targets)
    split_record = split_summary(out_rows, split_by, groups, split, split_reason, val_fraction)
    train = [s for s in out_rows if s["misc"]["split"] == "train"]
    val = [s for s in out_rows if s["misc"]["split"] == "val"]
    quarantine.sort(key=lambda q: q["line"])
    fix_counts: dict[str, int] = {}
    warn_counts: dict[str, int] = {}
    for s in kept:
        for f in s["misc"]["fixes"]:
            fix_counts[f["kind"]] = fix_counts.get(f["kind"], 0) + 1
        for w in s["misc"].get("warnings", []):
            warn_counts[w] = warn_counts.get(w, 0) + 1
    reason_counts: dict[str, int] = {}
    for q in quarantine:
        reason_counts[q["reason"]] = reason_counts.get(q["reason"], 0) + 1
    summary = {
        "rows_in": len(rows), "rows_kept": len(kept), "rows_quarantined": len(quarantine),
        "rows_train": len(train), "rows_val": len(val),
        "fixes": dict(sorted(fix_counts.items())), "warnings": dict(sorted(warn_counts.items())),
        "reasons": dict(sorted(reason_counts.items())),
        "split_by": split_by, "split": split_record, **({"cloning": cloning_record} if cloning_record else {}),
        "format": fmt, "input": str(manifest), "input_sha256": input_digest(manifest),
    }
    if summary["rows_in"] != summary["rows_kept"] + summary["rows_quarantined"]:
        raise RuntimeError(f"manifest invariant broken: {summary['rows_in']} rows in != {summary['rows_kept']} kept + "
                           f"{summary['rows_quarantined']} quarantined")
    write_jsonl(train_out, train)
    write_jsonl(val_out, val)
    write_jsonl(quarantine_out, quarantine)
    write_json(fixes_out, summary)

    log.info("%d rows in: %d kept (%d train, %d val), %d quarantined %s; fixes %s", len(rows), len(kept), len(train),
             len(val), len(quarantine), reason_counts, fix_counts)
    log.info("split by %s (%s): %d groups, %d val; val fraction %.3f of samples (asked %.3f)", split_by, split_reason,
             split_record["groups"], split_record["groups_val"], split_record["val_fraction_samples"], val_fraction)
    if kept and val_fraction > 0 and not val:
        log.warning("no val rows: all %d kept rows share clips%s, so none can be held out", len(kept),
                    " or speakers" if split_by == "speaker" else "")
    for q in quarantine[:20]:
        log.warning("line %d quarantined (%s): %s", q["line"], q["reason"], q["message"])
    if len(quarantine) > 20:
        log.warning("... and %d more in %s", len(quarantine) - 20, quarantine_out)
    if not rows:
        raise ManifestError(f"{manifest} has no rows")
    fraction = len(quarantine) / len(rows)
    limit = float(data["max_quarantine_fraction"])
    if fraction > limit:
        raise QuarantineTooLarge(
            f"{len(quarantine)} of {len(rows)} rows ({fraction:.1%}) quarantined, above data.max_quarantine_fraction="
            f"{limit}: read {quarantine_out} (each line has a reason and what to do), fix the data or raise the "
            "limit", fraction, quarantine_out)
    if not kept:
        raise ManifestError(f"no row of {manifest} survived; see {quarantine_out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on a too-large quarantine or an unusable input)."""
    parser = stage_parser("python -m higgs_tune.manifest", __doc__.split("\n\n")[0],
                          inputs={"manifest": {"required": False, "help": "the data manifest (default: data.manifest)"}},
                          outputs={name: f"the {name} file" for name in ("train", "val", "quarantine", "fixes")})
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_mod.config_from_args(args)
    try:
        run_manifest(cfg, manifest=args.manifest, train_out=args.train, val_out=args.val,
                     quarantine_out=args.quarantine, fixes_out=args.fixes)
    except (ManifestError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
