"""The training curves as CSV tables, for ``dvc plots`` (DVC reads CSV/TSV/JSON/YAML, not JSONL).

``train/metrics.jsonl`` (one row per optimizer step) -> ``train/curves.csv``;
``train/val_metrics.jsonl`` (one row per evaluation) -> ``train/val_curves.csv``.
Columns: every scalar field in order of first appearance (``step`` first); a list field ``name`` of
length n becomes ``name_0`` ... ``name_{n-1}`` (e.g. ``codebook_acc_0`` .. ``codebook_acc_7``).
A field a row lacks is an empty cell. An empty JSONL gives a CSV with the header ``step`` only.

CLI (as ``workflow/rules/curves.smk`` renders it)::

    python -m higgs_tune.curves --metrics M.jsonl --val-metrics V.jsonl --train-csv T.csv --val-csv VC.csv
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Any

from .fileio import read_jsonl, write_text
from .stage_cli import stage_parser


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """Scalars as they are, lists as ``name_i`` columns; nested dicts as ``name.key`` (recursively)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                out[f"{key}_{i}"] = v
        elif isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in flatten(value).items()})
        else:
            out[key] = value
    return out


def to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text of ``rows`` (see the module docstring for the columns)."""
    flat = [flatten(r) for r in rows]
    columns = ["step"]
    for r in flat:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def jsonl_to_csv(src: str | Path, dst: str | Path) -> int:
    """Write ``src`` (JSONL) as CSV to ``dst`` (atomically); returns the number of rows.

    Raises:
        FileNotFoundError: ``src`` does not exist.
        ValueError: a line of ``src`` is not JSON (naming the file and line).
    """
    rows = read_jsonl(src)
    write_text(dst, to_csv(rows))
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns 0 (errors raise, naming the file)."""
    parser = stage_parser("python -m higgs_tune.curves", __doc__.split("\n\n")[0], config=False,
                          inputs={"metrics": "train/metrics.jsonl", "val_metrics": "train/val_metrics.jsonl"},
                          outputs={"train": "train/curves.csv", "val": "train/val_curves.csv"})
    args = parser.parse_args(argv)
    n = jsonl_to_csv(args.metrics, args.train)
    m = jsonl_to_csv(args.val_metrics, args.val)
    print(f"curves: {n} train rows -> {args.train}, {m} val rows -> {args.val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
