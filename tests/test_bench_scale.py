"""bench/bench_scale.py starts and prints its usage (the bench itself runs minutes: not in tests)."""

from __future__ import annotations

from conftest import run_bench


def test_bench_scale_help_prints_usage(repo_root):
    proc = run_bench("bench_scale", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: bench_scale.py")
    for option in ("--sizes", "--manifest-sizes", "--tokenize-rows", "--shards", "--skip-train", "--work"):
        assert option in out, option
