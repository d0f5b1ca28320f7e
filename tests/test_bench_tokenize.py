"""bench/bench_tokenize.py starts and prints its usage (it once shadowed the stdlib ``tokenize`` module
as bench/tokenize.py, so that a bench script crashed inside ``import torch``)."""

from __future__ import annotations

import sys

from conftest import run_bench


def test_bench_tokenize_help_prints_usage(repo_root):
    proc = run_bench("bench_tokenize", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.startswith("usage: bench_tokenize.py")
    for option in ("--configfile", "--clips", "--threads", "--rounds", "--skip-main", "--ablation"):
        assert option in out, option
    assert "naive per-file loop" in out  # the description: what is compared


def test_bench_folder_does_not_shadow_stdlib(repo_root):
    """No bench script is named like a standard-library module (the script's folder is first on sys.path)."""
    names = {p.stem for p in (repo_root / "bench").glob("*.py")}
    assert not names & set(sys.stdlib_module_names), names & set(sys.stdlib_module_names)
