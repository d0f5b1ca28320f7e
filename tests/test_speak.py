"""``python -m higgs_tune.speak``: a text spoken by base + trained adapter or a merged folder, with
the evaluate stage's generation code, optionally cloning a reference clip."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import SHORT
from test_export import trained  # noqa: F401  (module fixture: a tiny demo adapter trained 6 steps)

ROOT = Path(__file__).resolve().parents[1]


def test_speak_writes_a_wav_from_a_trained_adapter(tmp_path, trained, lj_dir, transcripts):
    """python -m higgs_tune.speak: a 24 kHz WAV from base + adapter, cloning a reference clip (encoded
    by the demo audio tokenizer, no cache), and from a merged folder."""
    from higgs_tune.export import export
    from higgs_tune.speak import speak

    cfg, io = trained
    ref = lj_dir / "wavs" / f"{SHORT[0]}.wav"
    out = tmp_path / "hello.wav"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "workflow")}
    res = subprocess.run([sys.executable, "-m", "higgs_tune.speak", "--configfile", str(ROOT / "config" / "demo.yaml"),
                          "--adapter", str(io.adapter), "--text", "Hello there.", "--reference", str(ref),
                          "--reference-text", transcripts[SHORT[0]], "--max-seconds", "1", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    wave, rate = sf.read(out)
    assert rate == 24000 and 0 < len(wave) <= 25 * 960 and len(wave) % 960 == 0 and np.isfinite(wave).all()
    assert str(out) in res.stdout

    merged = export(cfg, adapter=io.adapter, out=tmp_path / "merged")
    a = speak(cfg, "Hello there.", tmp_path / "a.wav", adapter=io.adapter, max_seconds=1, temperature=0.0)
    m = speak(cfg, "Hello there.", tmp_path / "m.wav", merged=merged, max_seconds=1, temperature=0.0)
    assert a["n_frames"] == m["n_frames"] > 0 and a["sample_rate"] == 24000
    np.testing.assert_allclose(sf.read(tmp_path / "a.wav")[0], sf.read(tmp_path / "m.wav")[0], atol=1e-5)
    with pytest.raises(ValueError, match="reference-text"):
        speak(cfg, "Hi.", tmp_path / "x.wav", adapter=io.adapter, reference=ref)
