"""Voice-cloning pairs from speaker corpora (``data.cloning``): each target with another clip of
the same speaker, on the same side of the split."""

from __future__ import annotations

import random
from typing import Any

from .chatml import audio_refs, content_items
from .readers import clone_sample
from .split import sample_speaker


def _tts_parts(sample: dict) -> tuple[str, dict] | None:
    """``(text, audio item)`` of a plain TTS row (its only audio is the last message, an assistant
    one, right after a user message of one text item), else ``None``."""
    msgs = sample["messages"]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant" or msgs[-2]["role"] != "user" or len(audio_refs(sample)) != 1:
        return None
    target, user = content_items(msgs[-1]), content_items(msgs[-2])
    if len(target) != 1 or target[0]["type"] != "audio" or len(user) != 1 or user[0]["type"] != "text":
        return None
    return user[0]["text"], target[0]


def build_cloning(samples: list[dict], cloning: dict[str, Any]) -> tuple[list[dict], set[int], dict[str, Any]]:
    """Voice-cloning samples from the plain TTS rows that name a speaker (``data.cloning``).

    Each such row (the target) is paired with ``references_per_target`` other rows of the same
    speaker on the same side of the split (``misc.split``, already assigned) whose clip differs
    (another audio hash: never a clip with itself) and lasts ``min_ref_s`` to ``max_ref_s`` seconds
    (``null``: no upper bound); fewer when fewer exist. The references are drawn without repeats
    from the candidates in id order by ``random.Random(f"{seed}:{target id}")``: deterministic,
    independent of the row order, linear in the rows. Each pair becomes a :func:`clone_sample`
    (reference turn, then the target turn, ``start_index=4``) with ``misc.id``
    ``{target id}~ref~{reference id}``, ``misc.cloning`` ``{"target", "reference"}`` (ids), the
    target's ``split``, ``source_line`` and ``language``, both clips' ``audio_sha256`` / ``audio_info``
    and durations set.

    Args:
        samples: kept rows with ``misc.split``, ``misc.audio_sha256`` and audio ``duration`` set.
        cloning: the ``data.cloning`` section (``references_per_target``, ``min_ref_s``,
            ``max_ref_s``, ``seed``).

    Returns:
        ``(built, targets, record)``: the new samples (target order: side, speaker, id), the
        indices into ``samples`` of the targets that got at least one pair, and the ``cloning``
        record of ``fixes.json``: ``built`` / ``built_train`` / ``built_val``, ``eligible`` (plain
        TTS rows naming a speaker), ``targets``, ``targets_without_reference``, ``speakers``.
    """
    k, seed = int(cloning["references_per_target"]), int(cloning["seed"])
    lo, hi = float(cloning["min_ref_s"]), cloning["max_ref_s"]
    pools: dict[tuple[str, str], list[tuple[str, int, str, dict]]] = {}
    for i, s in enumerate(samples):
        speaker, parts = sample_speaker(s), _tts_parts(s)
        if speaker is None or parts is None:
            continue
        pools.setdefault((s["misc"]["split"], speaker), []).append((s["misc"]["id"], i, *parts))
    built: list[dict] = []
    targets: set[int] = set()
    without = 0
    for (side, speaker), pool in sorted(pools.items()):
        pool.sort()
        sha = {i: samples[i]["misc"]["audio_sha256"][item["audio_url"]] for _, i, _, item in pool}
        refs = [entry for entry in pool if lo <= entry[3]["duration"] and (hi is None or entry[3]["duration"] <= hi)]
        per_clip: dict[str, int] = {}
        for _, i, _, _ in refs:
            per_clip[sha[i]] = per_clip.get(sha[i], 0) + 1
        for tid, ti, text, item in pool:
            available = len(refs) - per_clip.get(sha[ti], 0)
            if available <= k:
                chosen = [r for r in refs if sha[r[1]] != sha[ti]]
            else:
                rng, picked, chosen = random.Random(f"{seed}:{tid}"), set(), []
                while len(chosen) < k:
                    j = rng.randrange(len(refs))
                    if j not in picked and sha[refs[j][1]] != sha[ti]:
                        picked.add(j)
                        chosen.append(refs[j])
            if not chosen:
                without += 1
                continue
            targets.add(ti)
            target = samples[ti]
            for rid, ri, ref_text, ref_item in chosen:
                ref = samples[ri]
                row = clone_sample(text, item["audio_url"], ref_text, ref_item["audio_url"], speaker,
                                   f"{tid}~ref~{rid}")
                row["messages"][2]["content"]["duration"] = ref_item["duration"]
                row["messages"][4]["content"]["duration"] = item["duration"]
                urls = (ref_item["audio_url"], item["audio_url"])
                misc = row["misc"]
                misc["cloning"] = {"target": tid, "reference": rid}
                if target["misc"].get("language"):
                    misc["language"] = target["misc"]["language"]
                misc["audio_sha256"] = {u: src["misc"]["audio_sha256"][u] for u, src in zip(urls, (ref, target))}
                misc["audio_info"] = {u: src["misc"]["audio_info"][u] for u, src in zip(urls, (ref, target))}
                misc["source_line"] = target["misc"]["source_line"]
                warnings = sorted(set(ref["misc"].get("warnings", [])) | set(target["misc"].get("warnings", [])))
                if warnings:
                    misc["warnings"] = warnings
                misc["fixes"] = []
                misc["split"] = side
                built.append(row)
    record = {"built": len(built), "built_train": sum(r["misc"]["split"] == "train" for r in built),
              "built_val": sum(r["misc"]["split"] == "val" for r in built),
              "eligible": sum(len(p) for p in pools.values()), "targets": len(targets),
              "targets_without_reference": without, "speakers": len({sp for _, sp in pools})}
    return built, targets, record
