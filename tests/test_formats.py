"""The manifest stage on the formats users bring (train-higgs-audio folders, ms-swift JSONL, raw JSONL,
ChatML with content lists), each written here from the shipped LJSpeech clips; voice-cloning pairs
built from a speaker corpus (data.cloning); the language per row; the linear split."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from higgs_tune import manifest as mf
from higgs_tune.audio_io import audio_sha256, load_audio
from higgs_tune.data import audio_items, build_dataset_sample, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------ helpers
def transcripts(lj_dir: Path) -> dict[str, str]:
    """LJSpeech id -> transcript, from the shipped metadata.csv."""
    out = {}
    for line in (lj_dir / "metadata.csv").read_text(encoding="utf-8").splitlines():
        fields = line.split("|")
        out[fields[0]] = fields[2] if len(fields) == 3 and fields[2].strip() else fields[1]
    return out


def clip_sha(path: Path) -> str:
    return audio_sha256(*load_audio(path))


def run_cli(tmp_path: Path, manifest: Path, name: str) -> tuple[int, str, Path]:
    """The manifest stage as the rule runs it, over config/demo.yaml + an overlay setting only
    ``experiment`` and ``data.manifest``; returns (exit status, stderr, output folder)."""
    overlay = tmp_path / f"{name}.yaml"
    overlay.write_text(yaml.safe_dump({"experiment": name, "data": {"manifest": str(manifest)}}))
    out = tmp_path / "results" / name / "manifest"
    proc = subprocess.run(
        [sys.executable, "-m", "higgs_tune.manifest", "--configfile", str(ROOT / "config" / "demo.yaml"),
         "--configfile", str(overlay), "--train", str(out / "train.jsonl"), "--val", str(out / "val.jsonl"),
         "--quarantine", str(out / "quarantine.jsonl"), "--fixes", str(out / "fixes.json")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")}, capture_output=True, text=True)
    return proc.returncode, proc.stderr, out


def kept_rows(out: Path) -> list[dict]:
    return read_jsonl(out / "train.jsonl") + read_jsonl(out / "val.jsonl")


def target(row: dict) -> tuple[str, str]:
    """(the learned turn's transcript, its audio path) of a kept TTS or cloning row."""
    msgs = row["messages"]
    return msgs[-2]["content"]["text"], msgs[-1]["content"]["audio_url"]


def run(cfg: dict, tmp_path: Path, name: str) -> tuple[dict, list[dict], list[dict], list[dict]]:
    """run_manifest in-process; returns (fixes.json, train, val, quarantine)."""
    d = tmp_path / "inproc" / name
    summary = mf.run_manifest(cfg, train_out=d / "t.jsonl", val_out=d / "v.jsonl", quarantine_out=d / "q.jsonl",
                              fixes_out=d / "f.json")
    return summary, read_jsonl(d / "t.jsonl"), read_jsonl(d / "v.jsonl"), read_jsonl(d / "q.jsonl")


def with_data(cfg: dict, **data) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["data"].update({k: str(v) if isinstance(v, Path) else v for k, v in data.items()})
    return cfg


# ------------------------------------------------------------------------------- fixture builders
def tha_folder(dest: Path, lj_dir: Path, ids: list[str]) -> list[dict]:
    """A train-higgs-audio dataset folder: clips and X.txt transcripts copied in, metadata.json with
    relative paths, scene, language, speaker_id, a voice-cloning sample (ref_audio_file +
    ref_transcript) and an unknown field. Returns the samples written."""
    text = transcripts(lj_dir)
    dest.mkdir(parents=True)
    samples = []
    for n, sid in enumerate(ids):
        shutil.copy(lj_dir / "wavs" / f"{sid}.wav", dest / f"{sid}.wav")
        (dest / f"{sid}.txt").write_text(text[sid] + "\n", encoding="utf-8")
        s = {"id": sid, "audio_file": f"{sid}.wav", "transcript_file": f"{sid}.txt", "speaker_id": "lj_speaker",
             "language": "en", "scene": "quiet_room" if n % 2 else "phone_call", "emotion": "neutral",
             "duration": 1.0}
        samples.append(s)
    samples[0].update(ref_audio_file=f"{ids[1]}.wav", ref_transcript=text[ids[1]])
    (dest / "metadata.json").write_text(json.dumps({"dataset_info": {"total_samples": len(samples)},
                                                    "samples": samples}, indent=2), encoding="utf-8")
    return samples


# ---------------------------------------------------------------- each reader, through the CLI
def test_community_formats_all_rows_kept_via_overlay(tmp_path, lj_dir, text_tokenizer):
    """A train-higgs-audio folder (and its metadata.json, and its X.wav + X.txt fallback), an ms-swift
    JSONL, a raw JSONL and a ChatML JSONL of content lists, all from the shipped clips, through an
    overlay setting only experiment and data.manifest: every row kept, read as written."""
    text = transcripts(lj_dir)
    ids = sorted(text)[:8]
    wav = {sid: lj_dir / "wavs" / f"{sid}.wav" for sid in ids}
    sha = {sid: clip_sha(p) for sid, p in wav.items()}
    norm = {sid: mf.normalize_text(t)[0] for sid, t in text.items()}

    # train-higgs-audio folder
    tha = tha_folder(tmp_path / "tha", lj_dir, ids)
    # its fallback: a folder of X.wav + X.txt pairs only
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for sid in ids[:5]:
        shutil.copy(wav[sid], pairs / f"{sid}.wav")
        (pairs / f"{sid}.txt").write_text(text[sid], encoding="utf-8")
    # ms-swift: absolute audio paths; TTS rows (transcript in the assistant) and ASR rows (<audio> in the user)
    swift = tmp_path / "swift" / "train.jsonl"
    swift.parent.mkdir()
    with open(swift, "w", encoding="utf-8") as f:
        for n, sid in enumerate(ids):
            if n % 2:
                msgs = [{"role": "user", "content": "<audio>What does the speaker say?"},
                        {"role": "assistant", "content": text[sid]}]
            else:
                msgs = [{"role": "assistant", "content": text[sid]}]
            f.write(json.dumps({"messages": msgs, "audios": [str(wav[sid])], "source": "lj"}) + "\n")
    # raw JSONL: relative paths, optional speaker / language / id / reference, an unknown field
    raw = tmp_path / "raw" / "data.jsonl"
    (raw.parent / "clips").mkdir(parents=True)
    with open(raw, "w", encoding="utf-8") as f:
        for n, sid in enumerate(ids):
            shutil.copy(wav[sid], raw.parent / "clips" / f"{sid}.wav")
            row = {"audio": f"clips/{sid}.wav", "text": text[sid], "speaker": "LJ", "language": "en-US",
                   "id": sid, "quality": 4}
            if n == 3:
                row.update(ref_audio=f"clips/{ids[0]}.wav", ref_text=text[ids[0]])
            f.write(json.dumps(row) + "\n")
    # ChatML whose turns are content lists (text + audio items in user and assistant turns)
    lists = tmp_path / "lists" / "m.jsonl"
    lists.parent.mkdir()
    with open(lists, "w", encoding="utf-8") as f:
        for n, sid in enumerate(ids[:6]):
            ref = ids[(n + 1) % 6]
            f.write(json.dumps({"messages": [
                {"role": "system", "content": [{"type": "text", "text": mf.CLONE_SYSTEM_PROMPT}]},
                {"role": "user", "content": [{"type": "text", "text": text[ref]}, {"type": "audio",
                                                                                   "audio_url": str(wav[ref])}]},
                {"role": "user", "content": [{"type": "text", "text": text[sid]}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Here it is."},
                                                  {"type": "audio", "audio_url": str(wav[sid])}]},
            ], "language": "en", "misc": {"id": f"list-{sid}"}}) + "\n")

    cases = [(tmp_path / "tha", "train_higgs_audio", len(ids)),
             (tmp_path / "tha" / "metadata.json", "train_higgs_audio", len(ids)),
             (pairs, "train_higgs_audio", 5), (swift, "ms_swift", len(ids)), (raw, "raw_jsonl", len(ids)),
             (lists, "chatml", 6)]
    for i, (manifest, fmt, n) in enumerate(cases):
        name = f"{fmt}{i}"
        rc, err, out = run_cli(tmp_path, manifest, name)
        assert rc == 0, err
        fixes = json.loads((out / "fixes.json").read_text())
        assert fixes["format"] == fmt, name
        assert (fixes["rows_in"], fixes["rows_kept"], fixes["rows_quarantined"]) == (n, n, 0), name
        assert read_jsonl(out / "quarantine.jsonl") == []
        rows = kept_rows(out)
        assert len(rows) == n
        for row in rows:  # every audio hashed, resolved to a real file
            for _, _, item in audio_items(row):
                assert os.path.isfile(item["audio_url"]) and item["duration"] > 0.5
                assert row["misc"]["audio_sha256"][item["audio_url"]] in sha.values()
        by_id = {r["misc"]["id"]: r for r in rows}

        if fmt == "train_higgs_audio" and manifest != pairs:
            assert set(by_id) == set(ids)
            for s in tha:
                row = by_id[s["id"]]
                t, url = target(row)
                assert t == norm[s["id"]] and row["misc"]["audio_sha256"][url] == sha[s["id"]]
                assert row["speaker"] == "lj_speaker" and row["misc"]["language"] == "en"
                assert row["misc"]["extra"] == {"emotion": "neutral", "duration": 1.0}
                scene = s["scene"].replace("_", " ")
                assert row["messages"][0]["content"]["text"] == mf.scene_system_prompt(s["scene"])
                assert f"Audio is recorded from {scene}." in row["messages"][0]["content"]["text"]
            clone = by_id[ids[0]]
            assert clone["start_index"] == 4 and len(audio_items(clone)) == 2
            assert clone["messages"][1]["content"]["text"] == norm[ids[1]]
            ref_url = clone["messages"][2]["content"]["audio_url"]
            assert clone["misc"]["audio_sha256"][ref_url] == sha[ids[1]]
            assert "start_index" not in by_id[ids[1]]
        elif manifest == pairs:
            assert set(by_id) == set(ids[:5])
            for sid, row in by_id.items():
                t, url = target(row)
                assert t == norm[sid] and row["misc"]["audio_sha256"][url] == sha[sid]
                assert row["messages"][0]["content"]["text"] == mf.TTS_SYSTEM_PROMPT
        elif fmt == "ms_swift":
            got = {}
            for row in rows:
                t, url = target(row)
                got[row["misc"]["audio_sha256"][url]] = t
                assert row["misc"]["extra"]["source"] == "lj"
            assert got == {sha[sid]: norm[sid] for sid in ids}  # the transcript, never the ASR instruction
            asr = [r for r in rows if "messages" in r["misc"]["extra"]]
            assert len(asr) == len(ids) // 2
            assert all(r["misc"]["extra"]["messages"][0]["content"] == "<audio>What does the speaker say?"
                       for r in asr)
        elif fmt == "raw_jsonl":
            assert set(by_id) == set(ids)
            for sid, row in by_id.items():
                t, url = target(row)
                assert t == norm[sid] and row["misc"]["audio_sha256"][url] == sha[sid]
                assert row["speaker"] == "LJ" and row["misc"]["language"] == "en-US"
                assert row["misc"]["extra"] == {"quality": 4}
            assert by_id[ids[3]]["start_index"] == 4
            assert by_id[ids[3]]["misc"]["audio_sha256"][by_id[ids[3]]["messages"][2]["content"]["audio_url"]] \
                == sha[ids[0]]
        else:  # content lists: kept as lists, both audio items hashed, language carried into misc
            for sid in ids[:6]:
                row = by_id[f"list-{sid}"]
                assert isinstance(row["messages"][1]["content"], list) and len(audio_items(row)) == 2
                assert row["messages"][3]["content"][1]["audio_url"] == os.path.abspath(wav[sid])
                assert row["misc"]["audio_sha256"][str(wav[sid])] == sha[sid]
                assert row["misc"]["language"] == "en" and row["language"] == "en"
                fake = lambda h: torch.randint(0, 1024, (8, 4), generator=torch.Generator().manual_seed(  # noqa
                    int(h[:8], 16)))
                sample = build_dataset_sample(row, text_tokenizer, fake)  # list content trains downstream
                assert sample.audio_ids_start.numel() == 2 and (sample.label_ids != -100).any()
        # the audio the DVC stages declare as deps: what the stage reads, for every format
        assert set(mf.referenced_audio(manifest, {"format": "auto", "data_root": None})) == {
            Path(i["audio_url"]) for r in rows for _, _, i in audio_items(r)}, name


def test_format_detection_and_explicit_names(tmp_path, lj_dir):
    """auto tells each format from its first row; naming a format reads the file as that format."""
    tha_folder(tmp_path / "tha", lj_dir, sorted(transcripts(lj_dir))[:2])
    cases = {"a.jsonl": ('{"messages": [], "audios": ["x.wav"]}\n', "ms_swift"),
             "b.jsonl": ('{"audio": "x.wav", "text": "hi"}\n', "raw_jsonl"),
             "c.jsonl": ('{"messages": [{"role": "user", "content": "x"}]}\n', "chatml"),
             "d.json": ('[{"messages": []}]', "chatml"),
             "e.jsonl": ('{"samples": [{"audio_file": "x.wav"}]}\n', "train_higgs_audio"),
             "f.csv": ("audio,text\nx.wav,hi\n", "csv"), "g.csv": ("x|hi\n", "ljspeech")}
    for name, (body, fmt) in cases.items():
        (tmp_path / name).write_text(body)
        assert mf.detect_format(tmp_path / name) == fmt, name
        assert mf.detect_format(tmp_path / name, "raw_jsonl") == "raw_jsonl"
    assert mf.detect_format(tmp_path / "tha") == "train_higgs_audio"
    assert mf.detect_format(tmp_path / "tha" / "metadata.json") == "train_higgs_audio"  # indented JSON
    with pytest.raises(mf.ManifestError, match="folder"):
        mf.detect_format(tmp_path / "tha", "chatml")
    # a raw JSONL row read as ChatML has no messages: quarantined, not misread
    rows = mf.read_rows(tmp_path / "b.jsonl", "chatml")
    with pytest.raises(mf.Reject, match="messages"):
        mf.normalize_structure(rows[0].sample, [])


def test_unreadable_rows_quarantined_with_reasons(tmp_config, tmp_path, lj_dir):
    """Bad rows in each new format go to quarantine with a reason, the field and the row (its line /
    samples[i]); the good ones are kept."""
    text = transcripts(lj_dir)
    ids = sorted(text)[:4]
    cfg = with_data(tmp_config, max_quarantine_fraction=1.0)

    samples = tha_folder(tmp_path / "tha", lj_dir, ids)
    samples[1]["transcript_file"] = "nope.txt"
    samples[2].pop("ref_transcript", None)
    samples[2]["ref_audio_file"] = f"{ids[0]}.wav"
    samples[3]["language"] = "english language"
    (tmp_path / "tha" / "metadata.json").write_text(json.dumps({"samples": samples}))
    summary, train, val, q = run(with_data(cfg, manifest=tmp_path / "tha"), tmp_path, "tha")
    assert summary["rows_kept"] == 1 and {r["misc"]["id"] for r in train + val} == {ids[0]}
    assert [(e["line"], e["reason"], e.get("field")) for e in q] == [
        (2, "missing_file", "transcript_file"), (3, "schema_violation", "ref_transcript"),
        (4, "schema_violation", "misc.language")]
    assert "samples[1].transcript_file 'nope.txt'" in q[0]["message"] and q[0]["row"] == samples[1]

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for sid in ids[:3]:
        shutil.copy(lj_dir / "wavs" / f"{sid}.wav", pairs / f"{sid}.wav")
    for sid in ids[:2]:
        (pairs / f"{sid}.txt").write_text(text[sid])
    (pairs / "notes.txt").write_text("not a transcript")
    summary, train, val, q = run(with_data(cfg, manifest=pairs), tmp_path, "pairs")
    assert summary["rows_in"] == 3 and summary["rows_kept"] == 2
    assert [(e["line"], e["reason"]) for e in q] == [(3, "missing_file")] and ids[2] in q[0]["message"]

    wav = str(lj_dir / "wavs" / f"{ids[0]}.wav")
    swift = tmp_path / "s.jsonl"
    swift.write_text("\n".join(json.dumps(r) for r in [
        {"messages": [{"role": "assistant", "content": text[ids[0]]}], "audios": [wav]},
        {"messages": [{"role": "assistant", "content": "hi"}], "audios": [wav, wav]},
        {"messages": [{"role": "user", "content": "<audio><audio>"}], "audios": [wav]},
        {"messages": [{"role": "user", "content": "<audio>"}], "audios": [wav]},
        {"messages": "hello", "audios": [wav]},
    ]) + "\n{not json\n")
    summary, train, val, q = run(with_data(cfg, manifest=swift), tmp_path, "swift")
    assert summary["format"] == "ms_swift" and summary["rows_kept"] == 1
    assert [(e["line"], e["reason"], e.get("field")) for e in q] == [
        (2, "schema_violation", "audios"), (3, "schema_violation", "audios"), (4, "empty_transcript", "messages"),
        (5, "schema_violation", "messages"), (6, "malformed_json", None)]

    raw = tmp_path / "r.jsonl"
    raw.write_text("\n".join(json.dumps(r) for r in [
        {"audio": wav, "text": text[ids[0]], "speaker": 7}, {"audio": wav, "text": 5}, {"text": "no audio"},
        {"audio": wav, "text": "x", "ref_audio": wav}, {"audio": str(tmp_path / "gone.wav"), "text": "x"},
        {"audio": wav, "text": "   "}]) + "\n")
    summary, train, val, q = run(with_data(cfg, manifest=raw), tmp_path, "raw")
    assert summary["format"] == "raw_jsonl" and summary["rows_kept"] == 1
    assert [r["speaker"] for r in train + val] == ["7"]  # a numeric speaker id is read as its string
    assert [(e["line"], e["reason"], e.get("field")) for e in q] == [
        (2, "schema_violation", "text"), (3, "schema_violation", "audio"), (4, "schema_violation", "ref_text"),
        (5, "missing_file", "messages[2].content"), (6, "empty_transcript", "messages[1].content")]
    assert all(e["row"] for e in q) and all(f"line {e['line']}" in e["message"] for e in q[:3])


def test_csv_keeps_unknown_columns_and_language(tmp_config, tmp_path, lj_dir):
    text = transcripts(lj_dir)
    ids = sorted(text)[:3]
    csv = tmp_path / "m.csv"
    csv.write_text("audio,text,language,emotion\n" + "".join(
        f"{lj_dir / 'wavs' / sid}.wav,\"{text[sid]}\",zh,calm\n" for sid in ids))
    summary, train, val, q = run(with_data(tmp_config, manifest=csv), tmp_path, "csv")
    assert summary["rows_kept"] == 3
    for row in train + val:
        assert row["misc"]["language"] == "zh" and row["misc"]["extra"] == {"emotion": "calm"}


# ------------------------------------------------------------------------------- cloning pairs
def speaker_corpus(dest: Path, lj_dir: Path) -> Path:
    """A raw JSONL of 24 clips named by two speakers (A: the first 12 clips, B: the next 12), with one
    clip listed twice for A under two texts (the same clip: it must never be its own reference)."""
    text = transcripts(lj_dir)
    ids = sorted(text)[:24]
    dest.mkdir(parents=True, exist_ok=True)
    rows = [{"audio": str(lj_dir / "wavs" / f"{sid}.wav"), "text": text[sid], "speaker": "A" if n < 12 else "B",
             "id": sid, "language": "en"} for n, sid in enumerate(ids)]
    rows.append({**rows[1], "id": "again", "text": "the same clip, read again"})  # 1.9 s: a valid reference
    path = dest / "speakers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("split_by,k,keep_tts", [("speaker", 2, True), ("clip", 1, False)])
def test_cloning_pairs_stay_within_speaker_and_side(tmp_config, tmp_path, lj_dir, split_by, k, keep_tts,
                                                    text_tokenizer):
    """data.cloning on a two-speaker corpus: every built row's reference is another clip of the
    target's speaker on the target's side of the split (speaker split: whole speakers per side; clip
    split: one speaker spans both sides, pairs still never cross); deterministic; counted in fixes.json."""
    manifest = speaker_corpus(tmp_path / "corpus", lj_dir)
    cloning = {"enabled": True, "references_per_target": k, "min_ref_s": 1.0, "max_ref_s": 8.0, "seed": 3,
               "keep_tts": keep_tts}
    cfg = with_data(tmp_config, manifest=manifest, split_by=split_by, val_fraction=0.5, cloning=cloning)
    summary, train, val, q = run(cfg, tmp_path, "a")
    assert q == [] and summary["rows_kept"] == 25
    source = {r["id"]: r for r in read_jsonl(manifest)}
    side_of = {}
    for side, rows in (("train", train), ("val", val)):
        for r in rows:
            assert r["misc"]["split"] == side
            if "cloning" not in r["misc"]:
                side_of[r["misc"]["id"]] = side
    built = [r for r in train + val if "cloning" in r["misc"]]
    assert built and {r["misc"]["split"] for r in built} == {"train", "val"}
    sha = {sid: clip_sha(Path(r["audio"])) for sid, r in source.items()}
    dur = {sid: mf.probe_audio(r["audio"])["duration_s"] for sid, r in source.items()}
    per_target: dict[str, list[str]] = {}
    for r in built:  # over every built row
        tid, rid = r["misc"]["cloning"]["target"], r["misc"]["cloning"]["reference"]
        per_target.setdefault(tid, []).append(rid)
        assert source[tid]["speaker"] == source[rid]["speaker"] == r["speaker"]
        assert sha[tid] != sha[rid]  # another clip, never the target's own (nor its twin "again")
        assert 1.0 <= dur[rid] <= 8.0
        t_text, t_url = target(r)
        assert t_text == mf.normalize_text(source[tid]["text"])[0]
        assert r["misc"]["audio_sha256"][t_url] == sha[tid]
        ref_url = r["messages"][2]["content"]["audio_url"]
        assert r["messages"][1]["content"]["text"] == mf.normalize_text(source[rid]["text"])[0]
        assert r["misc"]["audio_sha256"][ref_url] == sha[rid] and r["start_index"] == 4
        assert r["messages"][2]["content"]["duration"] == pytest.approx(dur[rid])
        assert r["misc"]["language"] == "en" and r["misc"]["id"] == f"{tid}~ref~{rid}"
    # the side of each pair: the split of the source rows (recomputed without cloning)
    plain, ptrain, pval, _ = run(with_data(cfg, cloning={**cloning, "enabled": False}), tmp_path, "plain")
    plain_side = {r["misc"]["id"]: r["misc"]["split"] for r in ptrain + pval}
    for r in built:
        assert plain_side[r["misc"]["cloning"]["target"]] == plain_side[r["misc"]["cloning"]["reference"]] \
            == r["misc"]["split"]
    if split_by == "clip":  # the one clip-split case where a speaker is on both sides
        assert len({(plain_side[s], source[s]["speaker"]) for s in plain_side}) > 2
    # references per target: k, distinct, or every other eligible clip of that speaker and side
    without = 0
    for tid in plain_side:
        refs = per_target.get(tid, [])
        assert len(set(refs)) == len(refs)
        pool = [s for s in plain_side if plain_side[s] == plain_side[tid] and source[s]["speaker"] ==
                source[tid]["speaker"] and sha[s] != sha[tid] and 1.0 <= dur[s] <= 8.0]
        assert len(refs) == min(k, len(pool)), tid
        without += not pool
    rec = summary["cloning"]
    assert rec["built"] == len(built) and rec["built_val"] == sum(r["misc"]["split"] == "val" for r in built)
    assert rec["targets"] == len(per_target) and rec["eligible"] == 25 and rec["speakers"] == 2
    assert rec["targets_without_reference"] == without and len(per_target) + without == 25
    assert rec["tts_replaced"] == (0 if keep_tts else len(per_target))
    n_plain = sum("cloning" not in r["misc"] for r in train + val)
    assert n_plain == (25 if keep_tts else without)
    assert summary["rows_train"] + summary["rows_val"] == n_plain + len(built)
    assert "cloning" not in plain
    # deterministic: a rerun writes the same bytes
    run(cfg, tmp_path, "b")
    for f in ("t.jsonl", "v.jsonl"):
        assert (tmp_path / "inproc" / "a" / f).read_bytes() == (tmp_path / "inproc" / "b" / f).read_bytes()
    # and the built rows train downstream: the learned turn is the target's audio only
    fake = lambda h: torch.randint(0, 1024, (8, 4), generator=torch.Generator().manual_seed(int(h[:8], 16)))  # noqa
    for r in built[:4]:
        sample = build_dataset_sample(r, text_tokenizer, fake)
        assert sample.audio_ids_start.numel() == 2 and (sample.label_ids != -100).any()


# ------------------------------------------------------------------------------------ the split
def assign_splits_quadratic(sizes: dict[str, int], val_fraction: float, seed: int) -> dict[str, str]:
    """assign_splits as it was before it was made linear (the reference: same groups, same sides)."""
    order = sorted(sizes, key=lambda k: (mf.split_value(k, seed), k))
    target = val_fraction * sum(sizes.values())
    val: list[str] = []
    n_val = 0
    if val_fraction > 0:
        for key in order:
            if n_val + sizes[key] <= target:
                val.append(key)
                n_val += sizes[key]
        rest = [k for k in order if k not in set(val)]
        best = min(rest, key=lambda k: abs(n_val + sizes[k] - target), default=None)
        if best is not None and abs(n_val + sizes[best] - target) < abs(n_val - target):
            val.append(best)
        if not val and len(order) >= 2:
            val.append(min(order, key=lambda k: abs(sizes[k] - target)))
    if order and len(val) == len(order):
        val.pop()
    chosen = set(val)
    return {k: "val" if k in chosen else "train" for k in sizes}


def test_assign_splits_linear_matches_the_old_algorithm():
    rng = random.Random(0)
    for n, fraction, seed in [(3000, 0.1, 0), (2000, 0.05, 7), (1500, 0.3, 1), (500, 0.0, 0), (1, 0.5, 0),
                              (2, 0.1, 0), (40, 0.9, 2)]:
        sizes = {f"clip:g{i:05d}": rng.choice([1, 1, 1, 2, 3, 8, 40]) for i in range(n)}
        got = mf.assign_splits(sizes, fraction, seed)
        assert got == assign_splits_quadratic(sizes, fraction, seed), (n, fraction, seed)
