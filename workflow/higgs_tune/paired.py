"""Did fine-tuning help? Base model against fine-tuned one on the same prompts, sample by sample.

Both sides are the ``eval.generate`` rows of the same val prompts, generated with the same seeds
and sampling (``evaluate_base``: the base model, adapter absent; ``evaluate``: the fine-tuned one).
:func:`paired_rows` joins them by sample id into one row per sample with, per score, the base
value, the fine-tuned value and their difference ``delta = fine_tuned - base``. :func:`summarize`
gives, per score, the mean difference with a percentile 95 % confidence interval from a paired
bootstrap over samples (resample the samples with replacement, ``n_boot`` times, seeded; the
interval is the 2.5th and 97.5th percentile of the resampled mean differences) and the counts of
samples that got better, worse, or stayed equal (better = lower for an error rate, higher for SIM
and DNSMOS).

Scores (:data:`SCORES`): ``err`` (the row's ASR error rate: WER, or CER for a language written without
spaces; lower is better), ``sim`` (speaker similarity, higher is better), ``dnsmos_ovrl`` / ``dnsmos_sig``
/ ``dnsmos_bak`` (DNSMOS P.835, 1-5, higher is better). A sample with a score missing on either side
(no voiced audio: ``sim`` is ``None``) is left out of that score only.
"""

from __future__ import annotations

import numpy as np

#: a generation ending in at least this many seconds of silence is flagged (``silent_tail_rate``)
SILENT_TAIL_S = 1.0

#: score key -> (label, higher_is_better)
SCORES = {"err": ("WER / CER", False), "sim": ("SIM", True), "dnsmos_ovrl": ("DNSMOS OVRL", True),
          "dnsmos_sig": ("DNSMOS SIG", True), "dnsmos_bak": ("DNSMOS BAK", True)}


def row_error(row: dict) -> float | None:
    """The row's ASR error rate: its ``cer`` when ``asr_metric`` is ``"cer"``, else its ``wer``."""
    return row.get("cer") if row.get("asr_metric") == "cer" else row.get("wer")


def paired_rows(base: list[dict], tuned: list[dict]) -> list[dict]:
    """One row per sample present on both sides (fine-tuned order).

    Args:
        base, tuned: per-sample generation rows (``evaluate``'s ``generated.jsonl``): ``id`` and the
            :data:`SCORES` fields (``wer``/``cer`` + ``asr_metric``, ``sim``, ``dnsmos_*``).

    Returns:
        rows with ``id``, ``text``, ``language``, ``asr_metric``, and per score ``base_<k>``,
        ``tuned_<k>``, ``delta_<k>`` (``None`` where a side lacks it).

    Raises:
        ValueError: the two sides share no sample id, or a side repeats an id.
    """
    by_id = {}
    for r in base:
        if r["id"] in by_id:
            raise ValueError(f"base rows repeat sample id {r['id']!r}")
        by_id[r["id"]] = r
    if len({r["id"] for r in tuned}) != len(tuned):
        raise ValueError("fine-tuned rows repeat a sample id")
    out = []
    for t in tuned:
        b = by_id.get(t["id"])
        if b is None:
            continue
        row = {"id": t["id"], "text": t.get("text"), "language": t.get("language"), "asr_metric": t.get("asr_metric")}
        for k in SCORES:
            bv, tv = (row_error(b), row_error(t)) if k == "err" else (b.get(k), t.get(k))
            row[f"base_{k}"], row[f"tuned_{k}"] = bv, tv
            row[f"delta_{k}"] = tv - bv if bv is not None and tv is not None else None
        out.append(row)
    if not out:
        raise ValueError(f"the base rows ({len(base)}) and the fine-tuned rows ({len(tuned)}) share no sample id: "
                         "both must be generated from the same val manifest and eval.generate.n_samples")
    return out


def bootstrap_ci(deltas, *, n_boot: int, seed: int, level: float) -> tuple[float, float]:
    """Percentile CI of the mean of ``deltas`` by resampling them with replacement ``n_boot`` times.

    Args:
        deltas: float ``(n,)`` paired differences, ``n >= 1``.
        n_boot: resamples (``eval.bootstrap.resamples``).
        seed: ``numpy.random.default_rng`` seed: the same seed gives the same interval (``eval.bootstrap.seed``).
        level: coverage, in (0, 1) (``eval.bootstrap.level``).

    Returns:
        ``(low, high)``; ``(d, d)`` for a single sample.

    Raises:
        ValueError: no deltas, or ``level`` outside (0, 1).
    """
    d = np.asarray(deltas, dtype=np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("no paired differences to bootstrap")
    if not 0 < level < 1:
        raise ValueError(f"level {level}: must be in (0, 1), e.g. 0.95")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(int(n_boot), d.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def summarize(rows: list[dict], *, n_boot: int, seed: int, level: float) -> dict:
    """Per score of :data:`SCORES`: ``{label, higher_is_better, n, base, tuned, delta, ci_low, ci_high,
    better, worse, same}`` (means over the samples scored on both sides; ``None`` values and zero
    counts where no sample has it), plus ``n_samples``, ``n_boot``, ``seed``, ``level`` (as
    :func:`bootstrap_ci`'s; score ``i`` of :data:`SCORES` is resampled from ``seed + i``).

    The interval excludes 0 when the improvement (or regression) is larger than the sample-to-sample
    spread allows by chance; ``better``/``worse`` count samples whose difference points that way.
    """
    out = {"n_samples": len(rows), "n_boot": int(n_boot), "seed": int(seed), "level": level, "scores": {}}
    for i, (k, (label, higher)) in enumerate(SCORES.items()):
        keep = [r for r in rows if r.get(f"delta_{k}") is not None]
        d = np.array([r[f"delta_{k}"] for r in keep], dtype=np.float64)
        entry = {"label": label, "higher_is_better": higher, "n": len(keep), "base": None, "tuned": None,
                 "delta": None, "ci_low": None, "ci_high": None, "better": 0, "worse": 0, "same": 0}
        if keep:
            lo, hi = bootstrap_ci(d, n_boot=n_boot, seed=seed + i, level=level)
            sign = 1 if higher else -1
            entry.update(base=float(np.mean([r[f"base_{k}"] for r in keep])),
                         tuned=float(np.mean([r[f"tuned_{k}"] for r in keep])), delta=float(d.mean()),
                         ci_low=lo, ci_high=hi, better=int((sign * d > 0).sum()), worse=int((sign * d < 0).sum()),
                         same=int((d == 0).sum()))
        out["scores"][k] = entry
    return out


def health_rates(rows: list[dict]) -> dict:
    """Generation health of per-sample rows (``ended``, ``hit_max``, ``trailing_silence_s``, ``voiced``):
    ``eos_rate`` (share that closed the stream), ``hit_max_rate`` (share cut at ``max_seconds`` without
    EOS), ``silent_tail_rate`` (share ending in at least :data:`SILENT_TAIL_S` s of silence), mean
    ``trailing_silence_s`` (seconds) and ``voiced_rate``; ``None`` values for no rows."""
    n = len(rows)
    share = (lambda pred: sum(1 for r in rows if pred(r)) / n if n else None)
    return {"eos_rate": share(lambda r: r.get("ended")), "hit_max_rate": share(lambda r: r.get("hit_max")),
            "silent_tail_rate": share(lambda r: (r.get("trailing_silence_s") or 0) >= SILENT_TAIL_S),
            "trailing_silence_s": sum(r.get("trailing_silence_s") or 0 for r in rows) / n if n else None,
            "voiced_rate": share(lambda r: r.get("voiced"))}


def flagged(rows: list[dict]) -> list[dict]:
    """The generation-health problems of each row that has one: ``{id, problems}`` with problems among
    ``"cut at max_seconds without EOS"``, ``"silent tail N.N s"`` (at least :data:`SILENT_TAIL_S`) and
    ``"no voiced audio"``."""
    out = []
    for r in rows:
        problems = []
        if r.get("hit_max"):
            problems.append("cut at max_seconds without EOS")
        if (r.get("trailing_silence_s") or 0) >= SILENT_TAIL_S:
            problems.append(f"silent tail {r['trailing_silence_s']:.1f} s")
        if r.get("voiced") is False:
            problems.append("no voiced audio")
        if problems:
            out.append({"id": r["id"], "problems": problems})
    return out


__all__ = ["SCORES", "SILENT_TAIL_S", "bootstrap_ci", "flagged", "health_rates", "paired_rows", "row_error",
           "summarize"]
