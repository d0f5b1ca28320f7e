"""bench/bench_audit.py starts and documents its options (the benchmark itself is not a test: it times)."""

from __future__ import annotations


from conftest import run_bench


def test_bench_audit_help(repo_root):
    proc = run_bench("bench_audit", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("usage: bench/bench_audit.py")
    for opt in ("--configfile", "--train", "--val", "--index", "--repeat", "--runs", "--batch-size", "--threads",
                "--quick"):
        assert opt in out, opt
    assert "Throughput of the label audit's tensor checks" in out and "1,000 samples/s" in out


def test_bench_audit_rejects_partial_cached_inputs(repo_root):
    proc = run_bench("bench_audit", "--train", "t.jsonl")
    assert proc.returncode == 2
    assert "--train, --val and --index go together" in proc.stderr
