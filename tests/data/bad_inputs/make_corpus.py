"""Generate the bad-input corpus of the manifest stage from the real LJSpeech clips.

    PYTHONPATH=workflow python tests/data/bad_inputs/make_corpus.py

Deterministic: rewrites ``wavs/``, ``manifest.jsonl``, ``metadata.csv``, ``manifest.csv`` and
``README.md`` in this folder from ``data/ljspeech32`` (LJSpeech 1.1, public domain). ``ROWS``,
``LJSPEECH_ROWS`` and ``CSV_ROWS`` below are the single source of truth: each entry is a row plus
its expected outcome, and README.md's tables (which tests/test_manifest.py parses) come from them.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
LJ = REPO / "data" / "ljspeech32" / "wavs"
WAVS = HERE / "wavs"

TTS_SYSTEM = ("Generate audio following instruction.\n\n<|scene_desc_start|>\nAudio is recorded from a quiet room.\n"
              "<|scene_desc_end|>")
CLONE_SYSTEM = "Generate audio following instruction."
TEXT = {  # the real transcripts of the three short clips used whole
    "LJ001-0002": "in being comparatively modern.",
    "LJ001-0008": "has never been surpassed.",
    "LJ001-0013": "than in the same operations with ugly ones.",
}


def read(stem: str) -> tuple[np.ndarray, int]:
    x, sr = sf.read(LJ / f"{stem}.wav", dtype="float32")
    return x, sr


def to_rate(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    g = np.gcd(sr, target)
    return resample_poly(x, target // g, sr // g).astype(np.float32)


def wav_bytes(x: np.ndarray, sr: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, subtype=subtype, format="WAV")
    return buf.getvalue()


def float_wav(x: np.ndarray, sr: int) -> bytes:
    """Mono IEEE-float WAV bytes, written by hand: libsndfile adds a PEAK chunk with a timestamp."""
    data = x.astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, sr, 4 * sr, 4, 32)
    return (b"RIFF" + struct.pack("<I", 4 + 8 + len(fmt) + 8 + len(data)) + b"WAVE" + b"fmt "
            + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data)


def make_wavs() -> str:
    """Write wavs/; return the base64 of a valid 8 kHz WAV (for the inline raw_audio row)."""
    shutil.rmtree(WAVS, ignore_errors=True)
    WAVS.mkdir()
    for stem in TEXT:
        shutil.copyfile(LJ / f"{stem}.wav", WAVS / f"{stem}.wav")
    x8, sr = read("LJ001-0008")
    x2, _ = read("LJ001-0002")
    x13, _ = read("LJ001-0013")
    up = to_rate(x8, sr, 44100)
    sf.write(WAVS / "stereo_44k.wav", np.stack([up, 0.8 * up], axis=1), 44100, subtype="PCM_16")
    sf.write(WAVS / "narrow_8k.wav", to_rate(x2, sr, 8000), 8000, subtype="PCM_16")
    sf.write(WAVS / "silent.wav", np.zeros(sr, dtype=np.float32), sr, subtype="PCM_16")
    sf.write(WAVS / "too_short.wav", x2[: int(0.3 * sr)], sr, subtype="PCM_16")
    long = np.concatenate([to_rate(c, sr, 8000) for c in (x13, x8, x2, x13)])
    sf.write(WAVS / "too_long.wav", long, 8000, subtype="PCM_16")
    nan = to_rate(x2[:sr], sr, 8000)
    nan[4000] = np.nan
    (WAVS / "nan.wav").write_bytes(float_wav(nan, 8000))
    full = (LJ / "LJ001-0013.wav").read_bytes()
    (WAVS / "truncated_header.wav").write_bytes(full[:30])
    (WAVS / "truncated_data.wav").write_bytes(full[: len(full) // 2])
    (WAVS / "empty.wav").write_bytes(b"")
    sf.write(WAVS / "header_only.wav", np.zeros(0, dtype=np.float32), sr, subtype="PCM_16")
    (WAVS / "not_audio.wav").write_text("This is a text file, not audio.\n")
    os.symlink("../../../../data/ljspeech32/wavs/LJ001-0008.wav", WAVS / "outside_link.wav")
    return base64.b64encode(wav_bytes(to_rate(x8, sr, 8000), 8000)).decode()


def tts(text, audio, sid=None, **extra):
    row = {"messages": [{"role": "system", "content": TTS_SYSTEM}, {"role": "user", "content": text},
                        {"role": "assistant", "content": {"type": "audio", "audio_url": audio}}]}
    if sid is not None:
        row["misc"] = {"id": sid}
    row.update(extra)
    return row


def rows(b64: str) -> list[tuple]:
    """(row: dict | raw str | raw bytes, what is wrong, outcome, codes); None rows are blank lines."""
    a = {"type": "audio", "audio_url": "wavs/LJ001-0002.wav"}
    clone = {"messages": [
        {"role": "system", "content": {"type": "text", "text": CLONE_SYSTEM}},
        {"role": "user", "content": {"type": "text", "text": TEXT["LJ001-0002"]}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": "wavs/LJ001-0002.wav"}},
        {"role": "user", "content": {"type": "text", "text": TEXT["LJ001-0013"]}},
        {"role": "assistant", "content": {"type": "audio", "audio_url": "wavs/LJ001-0013.wav"}},
    ], "start_index": 4, "speaker": "LJ", "misc": {"id": "good-clone"}}
    text_only = tts("Say hello.", "x", "no-audio")
    text_only["messages"][2]["content"] = "Hello."
    before_start = json.loads(json.dumps(clone))
    before_start["messages"][4]["content"] = {"type": "text", "text": "Only text after start_index."}
    before_start["misc"]["id"] = "audio-before-start-index"
    mixed = tts(TEXT["LJ001-0008"], "wavs/LJ001-0008.wav", "mixed-case-roles")
    for m, r in zip(mixed["messages"], ("SYSTEM", "User", "Assistant ")):
        m["role"] = r
    nested = tts([{"type": "text", "text": TEXT["LJ001-0013"]}], "wavs/LJ001-0013.wav", "good-list-content",
                 speaker="LJ")
    nested["misc"]["lang"] = "en"
    return [
        (tts(TEXT["LJ001-0008"], "wavs/LJ001-0008.wav", "good-tts-0008"),
         "good TTS row (string content as in the demo)", "kept", "string_content, path_resolved, duration_measured"),
        (tts(TEXT["LJ001-0002"], "wavs/LJ001-0002.wav", "good-tts-0002"), "good TTS row", "kept", "path_resolved"),
        (clone, "good voice-cloning row, start_index 4", "kept", "path_resolved"),
        (nested, "good row, list content, speaker, extra misc key", "kept", "path_resolved"),
        (None,),
        (tts(TEXT["LJ001-0008"], "wavs/stereo_44k.wav", "stereo-44k"), "stereo 44.1 kHz clip (tokenize downmixes and "
         "resamples)", "kept", "path_resolved"),
        (tts(TEXT["LJ001-0002"], "wavs/narrow_8k.wav", "narrow-8k"), "8 kHz clip", "kept", "path_resolved"),
        (tts("(silence)", "wavs/silent.wav", "silent"), "1 s of digital silence: kept, misc.warnings "
         "`silent_audio`", "kept", "path_resolved"),
        ({"messages": [{"role": "system", "content": TTS_SYSTEM}, {"role": "user", "content": TEXT["LJ001-0008"]},
                       {"role": "assistant", "content": {"type": "audio", "audio_url": "placeholder",
                                                         "raw_audio": b64}}], "misc": {"id": "raw-audio-ok"}},
         "valid base64 `raw_audio` (8 kHz WAV)", "kept", "raw_audio_extracted"),
        (tts(TEXT["LJ001-0002"], "wavs\\LJ001-0002.wav", "windows-relative"), "Windows-style relative path "
         "`wavs\\LJ001-0002.wav`", "kept", "windows_path, path_resolved"),
        (mixed, "roles `SYSTEM`, `User`, `Assistant `", "kept", "role_normalized"),
        (tts("The cafe\u0301  served\tde\u0301ja\u0300 vu\u00a0", "wavs/LJ001-0008.wav", "nfd-text"),
         "NFD-decomposed accents, double space, tab, NBSP", "kept", "text_nfc, text_whitespace"),
        (tts(TEXT["LJ001-0013"], "wavs/LJ001-0013.wav"), "no id", "kept", "derived_id"),
        (tts(TEXT["LJ001-0002"], "wavs/LJ001-0002.wav", "good-tts-0008"), "id of line 1, different content",
         "kept", "duplicate_id_renamed"),
        ({"messages": [{"role": "system", "content": TTS_SYSTEM}, {"role": "user", "content": TEXT["LJ001-0013"]},
                       {"role": "assistant", "content": {"type": "audio", "audio_url": "wavs/LJ001-0013.wav",
                                                         "duration": 99.0}}], "misc": {"id": "wrong-duration"}},
         "audio item says duration 99.0 s", "kept", "duration_corrected"),
        (tts(TEXT["LJ001-0002"], "wavs/LJ001-0002.wav", 12345), "numeric id", "kept", "id_stringified"),
        ({"messages": [{"role": "system", "content": TTS_SYSTEM}, {"role": "user", "content": TEXT["LJ001-0008"]},
                       {"role": "assistant", "content": {"audio_url": "wavs/LJ001-0008.wav"}}],
          "misc": {"id": "no-type"}}, "audio item without `type`", "kept", "content_type_added"),
        (None,),
        (tts(TEXT["LJ001-0002"], "wavs/LJ001-0002.wav", "good-tts-0002"), "exact copy of line 2", "quarantined",
         "duplicate"),
        ('{"messages": [{"role": "user", "content": "unterminated}', "JSON cut mid-string", "quarantined",
         "malformed_json"),
        ("{'messages': []}", "single-quoted pseudo-JSON", "quarantined", "malformed_json"),
        (b'{"messages": "caf\xe9 in Latin-1"}', "bytes that are not UTF-8", "quarantined", "malformed_json"),
        ({"messages": "has never been surpassed."}, "`messages` is a string", "quarantined", "schema_violation"),
        ({"messages": [{"role": "system", "content": TTS_SYSTEM}, {"role": "user"},
                       {"role": "assistant", "content": a}], "misc": {"id": "no-content"}},
         "user message without `content`", "quarantined", "schema_violation"),
        ([1, 2, 3], "row is a JSON array", "quarantined", "schema_violation"),
        (tts(TEXT["LJ001-0002"], "wavs/LJ001-0002.wav", "bad-start-index", start_index=7),
         "start_index 7 with 3 messages", "quarantined", "schema_violation"),
        ({"messages": [{"role": "user", "content": TEXT["LJ001-0002"]},
                       {"role": "assistant", "content": {**a, "sr": 22050}}], "misc": {"id": "unknown-audio-key"}},
         "unknown key `sr` in an audio item", "quarantined", "schema_violation"),
        ({"messages": [{"role": "user", "content": TEXT["LJ001-0002"]},
                       {"role": "assistant", "content": {**a, "offset": 0.5}}], "misc": {"id": "offset-segment"}},
         "audio segment via `offset`", "quarantined", "schema_violation"),
        (tts(TEXT["LJ001-0008"], "https://example.com/LJ001-0008.wav", "remote-url"), "remote https audio_url",
         "quarantined", "schema_violation"),
        (tts("  \t ", "wavs/LJ001-0002.wav", "empty-text"), "whitespace-only transcript", "quarantined",
         "empty_transcript"),
        ({"messages": [{"role": "system", "content": TTS_SYSTEM}, {"role": "narrator", "content": "Once upon a time"},
                       {"role": "assistant", "content": a}], "misc": {"id": "narrator"}},
         "role `narrator`", "quarantined", "unsupported_role"),
        (text_only, "assistant answers in text only", "quarantined", "no_assistant_audio"),
        (before_start, "the only assistant audio is before start_index", "quarantined", "no_assistant_audio"),
        (tts("Traversal.", "../../../etc/passwd", "traversal"), "`../../../etc/passwd`", "quarantined",
         "path_escapes_root"),
        (tts("Absolute.", "/etc/passwd", "absolute-outside"), "absolute path outside the root", "quarantined",
         "path_escapes_root"),
        (tts(TEXT["LJ001-0008"], "wavs/outside_link.wav", "symlink-out"), "symlink to data/ljspeech32 (outside "
         "the root)", "quarantined", "path_escapes_root"),
        (tts(TEXT["LJ001-0008"], "C:\\Users\\alice\\tts\\wavs\\LJ001-0008.wav", "windows-absolute"),
         "absolute Windows path from another machine", "quarantined", "path_escapes_root"),
        (tts("Never recorded.", "wavs/LJ009-9999.wav", "missing"), "file does not exist", "quarantined",
         "missing_file"),
        (tts(TEXT["LJ001-0013"], "wavs/truncated_header.wav", "truncated-header"), "WAV cut inside its header",
         "quarantined", "undecodable_audio"),
        (tts(TEXT["LJ001-0013"], "wavs/truncated_data.wav", "truncated-data"), "WAV cut to half its data chunk",
         "quarantined", "undecodable_audio"),
        (tts("Not audio.", "wavs/not_audio.wav", "text-as-wav"), "a text file named .wav", "quarantined",
         "undecodable_audio"),
        (tts(TEXT["LJ001-0002"], "wavs/nan.wav", "nan-samples"), "float WAV with a NaN sample", "quarantined",
         "undecodable_audio"),
        (tts("Empty.", "wavs/empty.wav", "zero-byte"), "0-byte .wav", "quarantined", "zero_length_audio"),
        (tts("Header only.", "wavs/header_only.wav", "header-only"), "valid WAV header, 0 frames", "quarantined",
         "zero_length_audio"),
        (tts("in", "wavs/too_short.wav", "too-short"), "0.3 s clip (min 0.5 s)", "quarantined",
         "duration_out_of_range"),
        (tts("Four clips in a row.", "wavs/too_long.wav", "too-long"), "8.8 s clip (max 8.0 s)", "quarantined",
         "duration_out_of_range"),
        ({"messages": [{"role": "user", "content": TEXT["LJ001-0008"]},
                       {"role": "assistant", "content": {"type": "audio", "audio_url": "placeholder",
                                                         "raw_audio": "!!not*base64@@"}}],
          "misc": {"id": "bad-base64"}}, "`raw_audio` is not base64", "quarantined", "invalid_base64"),
        ({"messages": [{"role": "user", "content": TEXT["LJ001-0008"]},
                       {"role": "assistant", "content": {"type": "audio", "audio_url": "placeholder",
                                                         "raw_audio": base64.b64encode(b"hello, not audio").decode()}}],
          "misc": {"id": "base64-not-audio"}}, "`raw_audio` is base64 of text", "quarantined", "undecodable_audio"),
        (None,),
    ]


LJSPEECH_ROWS = [  # (line text or None for a blank line, what is wrong, outcome, codes)
    (f"LJ001-0008|{TEXT['LJ001-0008']}|{TEXT['LJ001-0008']}", "good, 3 fields", "kept", "path_resolved"),
    (f"LJ001-0002|{TEXT['LJ001-0002']}", "good, 2 fields", "kept", "path_resolved"),
    (None,),
    ("LJ009-9999|This clip was never recorded.", "no wavs/LJ009-9999.wav", "quarantined", "missing_file"),
    ("LJ001-0013|   ", "blank transcript", "quarantined", "empty_transcript"),
    (f"stereo_44k|{TEXT['LJ001-0008']}", "stereo 44.1 kHz clip", "kept", "path_resolved"),
    ("not_audio|This file is text, not audio.", "text file named .wav", "quarantined", "undecodable_audio"),
    (f"LJ001-0002|{TEXT['LJ001-0002']}", "exact copy of line 2", "quarantined", "duplicate"),
    ("too|many|pipes|here", "4 fields", "quarantined", "schema_violation"),
    ("../../../etc/passwd|Path traversal through the id.", "id escapes wavs/", "quarantined", "path_escapes_root"),
    (f"LJ001-0013|{TEXT['LJ001-0013']}|{TEXT['LJ001-0013']}", "good", "kept", "path_resolved"),
]

CSV_HEADER = "audio,text,speaker,ref_audio,ref_text"
CSV_ROWS = [  # (record text, possibly several lines, what is wrong, outcome, codes)
    (f"wavs/LJ001-0008.wav,{TEXT['LJ001-0008']},LJ,,", "good TTS row", "kept", "derived_id, path_resolved"),
    (f"wavs/LJ001-0013.wav,{TEXT['LJ001-0013']},LJ,wavs/LJ001-0002.wav,{TEXT['LJ001-0002']}",
     "good voice-cloning row", "kept", "derived_id, path_resolved"),
    (f"wavs\\LJ001-0002.wav,{TEXT['LJ001-0002']},,,", "Windows-style relative path", "kept", "windows_path"),
    ('wavs/LJ001-0008.wav,"has never  been\nsurpassed.",LJ,,', "quoted text with a newline and a double space "
     "(2 lines)", "kept", "text_whitespace"),
    (f"wavs/LJ001-0008.wav,{TEXT['LJ001-0008']},LJ,wavs/LJ001-0002.wav,", "ref_audio without ref_text",
     "quarantined", "schema_violation"),
    ("wavs/LJ001-0013.wav,   ,LJ,,", "blank text", "quarantined", "empty_transcript"),
    ("wavs/LJ009-9999.wav,This clip was never recorded.,,,", "missing file", "quarantined", "missing_file"),
    ("/etc/passwd,An absolute path outside the root.,,,", "absolute path outside the root", "quarantined",
     "path_escapes_root"),
    ("wavs/too_short.wav,in,,,", "0.3 s clip", "quarantined", "duration_out_of_range"),
    ("wavs/LJ001-0002.wav,too,many,fields,here,extra", "6 fields, header has 5", "quarantined", "schema_violation"),
    (",No audio path.,,,", "empty audio column", "quarantined", "schema_violation"),
]


def table(entries: list[tuple[int, str, str, str, str]]) -> list[str]:
    out = ["| line | id | what is wrong | outcome | reason / fixes |", "|---|---|---|---|---|"]
    for line, sid, what, outcome, codes in entries:
        cell = ", ".join(f"`{c.strip()}`" for c in codes.split(","))
        out.append(f"| {line} | {sid} | {what.replace('|', '&#124;')} | {outcome} | {cell} |")
    return out


def main() -> None:
    b64 = make_wavs()
    lines: list[bytes] = []
    jsonl_table = []
    for entry in rows(b64):
        if entry[0] is None:
            lines.append(b"")
            continue
        row, what, outcome, codes = entry
        if isinstance(row, bytes):
            lines.append(row)
        elif isinstance(row, str):
            lines.append(row.encode())
        else:
            lines.append(json.dumps(row, ensure_ascii=False).encode())
        sid = row.get("misc", {}).get("id", "") if isinstance(row, dict) else ""
        jsonl_table.append((len(lines), str(sid), what, outcome, codes))
    (HERE / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    lj_lines, lj_table = [], []
    for entry in LJSPEECH_ROWS:
        lj_lines.append(entry[0] or "")
        if entry[0] is not None:
            lj_table.append((len(lj_lines), entry[0].split("|")[0], *entry[1:]))
    (HERE / "metadata.csv").write_text("\n".join(lj_lines) + "\n")

    csv_lines, csv_table = [CSV_HEADER], []
    for record, what, outcome, codes in CSV_ROWS:
        csv_table.append((len(csv_lines) + 1, "", what, outcome, codes))
        csv_lines += record.split("\n")
    (HERE / "manifest.csv").write_text("\n".join(csv_lines) + "\n")

    readme = [
        "# Bad-input corpus of the manifest stage",
        "",
        "Generated by `make_corpus.py` (deterministic; do not edit by hand) from the real LJSpeech clips in",
        "`data/ljspeech32`. `tests/test_manifest.py` parses the tables below and asserts every row's outcome:",
        "`kept` rows must carry at least the listed fix kinds in `misc.fixes`; `quarantined` rows must be",
        "quarantined with exactly the listed reason. Line numbers are 1-based source lines; blank lines are",
        "not rows. Run with `config.yaml` (data_root = this folder, durations in [0.5, 8.0] s):",
        "",
        "    PYTHONPATH=workflow python -m higgs_tune.manifest --configfile config/demo.yaml \\",
        "        --configfile tests/data/bad_inputs/config.yaml",
        "",
        "Decisions: a silent clip is **kept** (silence is valid audio; the row gets `misc.warnings:",
        "[silent_audio]` and fixes.json counts it); stereo / 44.1 kHz / 8 kHz clips are kept (the tokenize",
        "stage downmixes and resamples); a WAV whose data chunk is shorter than its header says is",
        "`undecodable_audio` (libsndfile would silently read the half that is there); `offset` segments",
        "and remote URLs are `schema_violation`. Transcripts of the synthetic rows need not match the audio.",
        "`wavs/outside_link.wav` is a relative symlink to `data/ljspeech32/wavs/LJ001-0008.wav` (outside",
        "this folder); the test re-creates it in its copy of the corpus.",
        "",
        "Audio: `LJ001-0002/0008/0013.wav` are unmodified LJSpeech clips; `stereo_44k` (0008 upsampled,",
        "second channel at 0.8 gain), `narrow_8k` (0002 at 8 kHz), `silent` (1 s zeros), `too_short`",
        "(first 0.3 s of 0002), `too_long` (0013+0008+0002+0013 at 8 kHz, 8.8 s), `nan` (float WAV with a",
        "NaN), `truncated_header` (first 30 bytes of 0013), `truncated_data` (first half of 0013), `empty`",
        "(0 bytes), `header_only` (0 frames), `not_audio` (text).",
        "",
        "## manifest.jsonl (Higgs ChatML)",
        "",
        *table(jsonl_table),
        "",
        "## metadata.csv (LJSpeech: id|text[|normalized], audio wavs/{id}.wav)",
        "",
        *table(lj_table),
        "",
        "## manifest.csv (header audio,text,speaker,ref_audio,ref_text)",
        "",
        *table(csv_table),
        "",
    ]
    (HERE / "README.md").write_text("\n".join(readme))
    print(f"{len(jsonl_table)} + {len(lj_table)} + {len(csv_table)} rows written to {HERE}")


if __name__ == "__main__":
    main()
