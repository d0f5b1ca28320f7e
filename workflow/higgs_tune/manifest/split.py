"""The train/val split: groups that keep one clip (or one speaker) on one side, assigned by a
seeded hash (linear in the number of groups)."""

from __future__ import annotations

import hashlib
from typing import Any

from .rows import ManifestError


def split_value(key: str, seed: int) -> float:
    """``sha256(f"{seed}:{key}")`` as a uniform number in [0, 1)."""
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:16], 16) / 2**64


#: ``data.split_by`` values: what keeps train and val apart (see :func:`split_groups`).
SPLIT_BY = ("auto", "clip", "speaker")


def sample_speaker(sample: dict) -> str | None:
    """The row's speaker: the top-level ``speaker`` (ChatML; a CSV ``speaker`` column is put there),
    else ``misc.speaker``; ``None`` when neither is a non-empty string (LJSpeech rows name none)."""
    for value in (sample.get("speaker"), (sample.get("misc") or {}).get("speaker")):
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def split_groups(samples: list[dict], split_by: str) -> tuple[str, dict[str, list[int]], str]:
    """Partition ``samples`` into groups that must land in the same split.

    A sample touches every audio clip it holds (target and voice-cloning reference alike), a clip
    being its decoded audio's hash (``misc.audio_sha256`` values: the same recording under two
    paths is one clip). Samples touching a common clip are joined, transitively (connected
    components, union-find). With ``split_by="speaker"`` samples naming the same speaker
    (:func:`sample_speaker`) are joined as well, so no speaker, and still no clip, is on both sides;
    rows naming no speaker are then joined by their clips only. ``"auto"`` is ``"speaker"`` when the
    rows name at least two distinct speakers, else ``"clip"`` (a one-speaker corpus such as
    LJSpeech can only be held out by clip).

    Args:
        samples: kept rows (``misc.id`` and ``misc.audio_sha256`` set).
        split_by: one of :data:`SPLIT_BY` (``data.split_by``).

    Returns:
        ``(by, groups, reason)``: ``by`` is ``"clip"`` or ``"speaker"``; ``groups`` maps a group key
        (``"speaker:<smallest speaker name>"`` for a group naming speakers in speaker mode, else
        ``"clip:<smallest sample id>"``) to the group's sample indices (ascending); ``reason`` says
        why ``by`` was chosen.

    Raises:
        ManifestError: ``split_by`` is unknown, or ``"speaker"`` while fewer than two speakers are named.
    """
    if split_by not in SPLIT_BY:
        raise ManifestError(f"data.split_by={split_by!r}; use one of {list(SPLIT_BY)}")
    speakers = [sample_speaker(s) for s in samples]
    named = sorted({sp for sp in speakers if sp is not None})
    if split_by == "speaker" and len(named) < 2:
        raise ManifestError(f"data.split_by=speaker, but the rows name {len(named)} speaker(s) {named}: a split by "
                            "speaker needs at least 2; use split_by clip (or auto)")
    if split_by == "auto":
        by = "speaker" if len(named) >= 2 else "clip"
        reason = (f"auto: the rows name {len(named)} speakers" if by == "speaker" else
                  f"auto: the rows name {len(named)} speaker(s) {named[:1]}, too few to hold a speaker out")
    else:
        by, reason = split_by, f"data.split_by={split_by}"

    parent = list(range(len(samples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, str], int] = {}
    for i, s in enumerate(samples):
        nodes = [("clip", sha) for sha in (s["misc"].get("audio_sha256") or {}).values()]
        if by == "speaker" and speakers[i] is not None:
            nodes.append(("speaker", speakers[i]))
        for node in nodes:
            j = first.setdefault(node, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for i in range(len(samples)):
        members.setdefault(find(i), []).append(i)
    groups = {}
    for idx in members.values():
        names = sorted({speakers[i] for i in idx if speakers[i] is not None}) if by == "speaker" else []
        key = f"speaker:{names[0]}" if names else f"clip:{min(samples[i]['misc']['id'] for i in idx)}"
        groups[key] = idx
    return by, groups, reason


def assign_splits(sizes: dict[str, int], val_fraction: float, seed: int) -> dict[str, str]:
    """``group key -> "train" | "val"`` for groups of ``sizes[key]`` samples each.

    Val should hold ``target = val_fraction * total`` samples. Groups are visited in the order of
    :func:`split_value` of their key (ties by key); a group joins val when it fits,
    ``n_val + size <= target``. Then, of the groups left, the one (first in that order) that brings
    ``n_val`` nearest the target joins if it brings it nearer. So val holds about ``val_fraction`` of
    the samples, the more exactly the smaller the groups. The result depends on the set of groups and
    ``seed`` only, not on their order. With ``val_fraction > 0`` and at least 2 groups, if none
    joined val, the group whose size is nearest the target is val; with at least 1 group, if every
    group is val, the last one that joined goes back to train.
    """
    order = sorted(sizes, key=lambda k: (split_value(k, seed), k))
    target = val_fraction * sum(sizes.values())
    val: list[str] = []
    n_val = 0
    if val_fraction > 0:
        for key in order:
            if n_val + sizes[key] <= target:
                val.append(key)
                n_val += sizes[key]
        in_val = set(val)
        rest = [k for k in order if k not in in_val]
        best = min(rest, key=lambda k: abs(n_val + sizes[k] - target), default=None)
        if best is not None and abs(n_val + sizes[best] - target) < abs(n_val - target):
            val.append(best)
        if not val and len(order) >= 2:
            val.append(min(order, key=lambda k: abs(sizes[k] - target)))
    if order and len(val) == len(order):
        val.pop()
    chosen = set(val)
    return {k: "val" if k in chosen else "train" for k in sizes}


def split_summary(samples: list[dict], by: str, groups: dict[str, list[int]], split: dict[str, str], reason: str,
                  val_fraction: float) -> dict[str, Any]:
    """The ``split`` record of ``fixes.json`` for rows already marked ``misc.split``.

    Returns:
        ``by``, ``reason``, ``groups`` / ``groups_train`` / ``groups_val``, ``clips_train`` /
        ``clips_val`` (distinct audio hashes), ``speakers_train`` / ``speakers_val`` (distinct
        named speakers), ``val_fraction`` (asked) and ``val_fraction_samples`` (got).

    Raises:
        RuntimeError: a clip, or in speaker mode a speaker, is on both sides (a bug; never expected).
    """
    clips = {"train": set(), "val": set()}
    spk = {"train": set(), "val": set()}
    for s in samples:
        side = s["misc"]["split"]
        clips[side].update((s["misc"].get("audio_sha256") or {}).values())
        if sample_speaker(s) is not None:
            spk[side].add(sample_speaker(s))
    if clips["train"] & clips["val"] or (by == "speaker" and spk["train"] & spk["val"]):
        raise RuntimeError(f"split invariant broken: clips {len(clips['train'] & clips['val'])} / speakers "
                           f"{sorted(spk['train'] & spk['val'])} in both train and val")
    n_val = sum(s["misc"]["split"] == "val" for s in samples)
    return {"by": by, "reason": reason, "groups": len(groups),
            "groups_train": sum(v == "train" for v in split.values()),
            "groups_val": sum(v == "val" for v in split.values()),
            "clips_train": len(clips["train"]), "clips_val": len(clips["val"]),
            "speakers_train": len(spk["train"]), "speakers_val": len(spk["val"]),
            "val_fraction": val_fraction, "val_fraction_samples": n_val / len(samples) if samples else 0.0}
