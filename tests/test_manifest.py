"""The manifest stage on real data: the demo manifest, the bad-input corpus (tests/data/bad_inputs,
expected outcomes parsed from its README.md), LJSpeech metadata.csv and CSV/TSV inputs."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import soundfile as sf
import torch
import yaml

from higgs_tune import manifest as mf
from higgs_tune.audio_io import audio_sha256, load_audio
from higgs_tune.data import audio_items, build_dataset_sample, make_collator, read_jsonl
from higgs_tune.model import tiny_higgs_config

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "data" / "bad_inputs"


# ------------------------------------------------------------------------------------------ helpers
def readme_expectations(section: str) -> dict[int, tuple[str, set[str]]]:
    """``line -> (outcome, codes)`` from the README table under the heading naming ``section``."""
    text = (CORPUS / "README.md").read_text()
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    out = {}
    for row in body.splitlines():
        m = re.match(r"^\| (\d+) \|.*\| (kept|quarantined) \| (.*) \|$", row)
        if m:
            out[int(m.group(1))] = (m.group(2), set(re.findall(r"`([a-z0-9_]+)`", m.group(3))))
    assert out, f"no table rows under {section!r}"
    return out


def with_data(cfg: dict, **data) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg["data"].update({k: str(v) if isinstance(v, Path) else v for k, v in data.items()})
    return cfg


def out_paths(cfg: dict) -> dict[str, Path]:
    """The manifest rule's four outputs, laid out as the rules lay them out under results/{experiment}."""
    d = Path(cfg["results_dir"]) / cfg["experiment"] / "manifest"
    return {"train_out": d / "train.jsonl", "val_out": d / "val.jsonl", "quarantine_out": d / "quarantine.jsonl",
            "fixes_out": d / "fixes.json"}


def run(cfg: dict) -> dict:
    return mf.run_manifest(cfg, **out_paths(cfg))


def outputs(cfg: dict) -> tuple[list[dict], list[dict], list[dict], dict]:
    p = out_paths(cfg)
    return (read_jsonl(p["train_out"]), read_jsonl(p["val_out"]), read_jsonl(p["quarantine_out"]),
            json.loads(p["fixes_out"].read_text()))


def corpus_config(cfg: dict, corpus: Path, name: str = "manifest.jsonl", **data) -> dict:
    overlay = yaml.safe_load((CORPUS / "config.yaml").read_text())["data"]
    overlay.update(manifest=corpus / name, data_root=corpus, **data)
    return with_data(cfg, **overlay)


def check_outcomes(expected: dict, kept: list[dict], quarantine: list[dict], summary: dict) -> None:
    """Kept/quarantined lines and reasons exactly as in the README; kept rows carry the listed fixes."""
    got_q = {q["line"]: q["reason"] for q in quarantine}
    want_q = {line: codes for line, (outcome, codes) in expected.items() if outcome == "quarantined"}
    assert {line: {r} for line, r in got_q.items()} == want_q
    by_line = {r["misc"]["source_line"]: r for r in kept}
    assert set(by_line) == {line for line, (outcome, _) in expected.items() if outcome == "kept"}
    for line, row in by_line.items():
        kinds = {f["kind"] for f in row["misc"]["fixes"]}
        assert expected[line][1] <= kinds, (line, kinds)
    assert summary["rows_in"] == len(expected) == summary["rows_kept"] + summary["rows_quarantined"]
    assert summary["rows_kept"] == len(kept) and summary["rows_quarantined"] == len(quarantine)
    for q in quarantine:
        assert q["reason"] in mf.REASONS and isinstance(q["line"], int)
        assert len(q["message"]) > 20 and ("row" in q) != ("text" in q)
        if q["reason"] == "schema_violation":
            assert q["field"]


@pytest.fixture
def corpus(tmp_path, lj_dir) -> Path:
    """A copy of the bad-input corpus whose symlink points (absolute) outside it, at a real clip."""
    dest = tmp_path / "bad_inputs"
    shutil.copytree(CORPUS, dest, symlinks=True)
    link = dest / "wavs" / "outside_link.wav"
    if os.path.lexists(link):
        link.unlink()
    link.symlink_to(lj_dir / "wavs" / "LJ001-0008.wav")
    return dest


# ----------------------------------------------------------------------------------------- the demo
def test_demo_manifest_all_kept(tmp_config):
    summary = run(tmp_config)
    train, val, quarantine, fixes = outputs(tmp_config)
    assert fixes == summary
    assert (summary["rows_in"], summary["rows_kept"], summary["rows_quarantined"]) == (40, 40, 0)
    assert quarantine == [] and summary["reasons"] == {}
    assert len(train) + len(val) == 40 and len(val) >= 1
    assert summary["input_sha256"] and summary["format"] == "chatml"
    assert not {"text_nfc", "text_whitespace", "role_normalized"} & set(summary["fixes"])

    originals = read_jsonl(tmp_config["data"]["manifest"])
    kept = {r["misc"]["id"]: r for r in train + val}
    assert set(kept) == {o["misc"]["id"] for o in originals}
    for orig in originals:
        row, misc = kept[orig["misc"]["id"]], kept[orig["misc"]["id"]]["misc"]
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in orig["messages"]]
        assert row.get("start_index") == orig.get("start_index")
        urls = [c["audio_url"] for _, _, c in audio_items(row)]
        assert set(misc["audio_sha256"]) == set(misc["audio_info"]) == set(urls)
        for _, _, item in audio_items(row):
            url = item["audio_url"]
            assert os.path.isabs(url) and os.path.isfile(url)
            info = sf.info(url)
            assert misc["audio_info"][url] == {"duration_s": pytest.approx(info.frames / info.samplerate, abs=1e-9),
                                               "sample_rate": info.samplerate, "channels": info.channels}
            assert abs(misc["audio_info"][url]["duration_s"] - info.duration) < 1e-6
            assert item["duration"] == misc["audio_info"][url]["duration_s"]
        assert misc["source_line"] == originals.index(orig) + 1
        assert misc["split"] == ("val" if row in val else "train")
    row = train[0]
    url = row["messages"][2]["content"]["audio_url"]
    assert row["misc"]["audio_sha256"][url] == audio_sha256(*load_audio(url))


def clips_of(row: dict) -> set[str]:
    """The row's audio clips (target and references) as decoded-audio hashes."""
    return set(row["misc"]["audio_sha256"].values())


def assert_held_out(train: list[dict], val: list[dict], by_speaker: bool = False) -> None:
    """No val clip in any train sample (target or reference); with ``by_speaker`` no shared speaker."""
    train_clips = set().union(*(clips_of(r) for r in train))
    train_files = {u for r in train for u in r["misc"]["audio_sha256"]}
    for r in val:
        assert not clips_of(r) & train_clips, r["misc"]["id"]
        assert not set(r["misc"]["audio_sha256"]) & train_files, r["misc"]["id"]
    if by_speaker:
        assert not {mf.sample_speaker(r) for r in train} & {mf.sample_speaker(r) for r in val}


def test_demo_split_holds_clips_out(tmp_config):
    """The demo names one speaker (LJ), so it is split by clip: a voice-cloning sample goes with every
    sample sharing its target or reference clip, and val is still ~data.val_fraction of the samples."""
    summary = run(tmp_config)
    train, val, _, _ = outputs(tmp_config)
    assert_held_out(train, val)
    ids = {r["misc"]["id"] for r in val}
    # the old leak: LJ001-0028 was a val clip and the reference of a train cloning sample
    assert ("tts-LJ001-0028" in ids) == ("clone-LJ001-0029-ref-LJ001-0028" in ids) == ("tts-LJ001-0029" in ids)
    assert any(r["misc"]["id"].startswith("clone-") for r in val)  # a whole cloning group is held out
    split = summary["split"]
    assert summary["split_by"] == split["by"] == "clip" and "1 speaker" in split["reason"]
    # 40 samples: 8 groups of 3 (a cloning sample, its target's and its reference's TTS rows) + 16 single
    assert (split["groups"], split["groups_train"] + split["groups_val"]) == (24, 24)
    assert len(val) == split["val_fraction_samples"] * 40 == round(tmp_config["data"]["val_fraction"] * 40) == 5
    assert split["clips_train"] + split["clips_val"] == 32


def test_split_deterministic_and_order_free(tmp_config, tmp_path):
    run(tmp_config)
    p = out_paths(tmp_config)
    first = (p["train_out"].read_bytes(), p["val_out"].read_bytes())
    again = copy.deepcopy(tmp_config)
    again["results_dir"] = str(tmp_path / "again")
    run(again)
    assert (out_paths(again)["train_out"].read_bytes(), out_paths(again)["val_out"].read_bytes()) == first

    # the stage's own output is a valid input (absolute paths inside data_root): fed back in another
    # order, every row keeps its split and its messages
    train, val, _, _ = outputs(tmp_config)
    rows = list(reversed(val + train))
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sub = with_data(tmp_config, manifest=shuffled)
    sub["results_dir"] = str(tmp_path / "shuffled")
    summary = run(sub)
    assert summary["rows_kept"] == len(rows) and summary["rows_quarantined"] == 0
    s_train, s_val, _, _ = outputs(sub)
    before = {r["misc"]["id"]: r for r in rows}
    for r in s_train + s_val:
        assert r["misc"]["split"] == before[r["misc"]["id"]]["misc"]["split"]
        assert r["messages"] == before[r["misc"]["id"]]["messages"]
    # another seed: another val set, held out all the same
    other = with_data(tmp_config, split_seed=1)
    other["results_dir"] = str(tmp_path / "seed1")
    run(other)
    o_train, o_val, _, _ = outputs(other)
    assert {r["misc"]["id"] for r in o_val} != {r["misc"]["id"] for r in val}
    assert_held_out(o_train, o_val)


def test_assign_splits_guarantees():
    ids = {f"s{i}": 1 for i in range(10)}
    assert mf.assign_splits(ids, 0.0, 0) == {i: "train" for i in ids}
    for seed in range(5):
        two = {"s0": 1, "s1": 1}
        split = mf.assign_splits(two, 0.01, seed)
        assert sorted(split.values()) == ["train", "val"]
        assert split == mf.assign_splits(dict(reversed(two.items())), 0.01, seed)
    assert mf.assign_splits({"only": 5}, 0.9, 0) == {"only": "train"}
    assert sorted(mf.assign_splits({"a": 10, "b": 10}, 0.9, 0).values()) == ["train", "val"]
    # val holds about val_fraction of the samples, whatever the group sizes
    rng = __import__("random").Random(0)
    for frac in (0.05, 0.1, 0.25, 0.5):
        sizes = {f"g{i}": rng.choice([1, 1, 2, 3, 5]) for i in range(200)}
        n = sum(sizes.values())
        split = mf.assign_splits(sizes, frac, 0)
        n_val = sum(sizes[k] for k, v in split.items() if v == "val")
        assert abs(n_val - frac * n) <= 2.5, (frac, n_val, n)


def test_split_by_speaker_on_a_voice_cloning_manifest(tmp_config, tmp_path, lj_dir):
    """A cloning corpus with 4 (invented) speakers over the LJSpeech clips, with clips shared across
    rows: split by speaker, no speaker and no clip is on both sides, val ~ val_fraction."""
    clips = sorted((lj_dir / "wavs").glob("*.wav"))
    text = dict(line.rstrip("\n").split("|", 1) for line in open(lj_dir / "metadata.csv", encoding="utf-8"))
    speakers = ["ada", "bo", "cyd", "dee"]
    lines = ["audio,text,speaker,ref_audio,ref_text,id"]
    for i, clip in enumerate(clips):  # speaker k owns clips 4j+k (8 clips each)
        spk = speakers[i % 4]
        ref = clips[(i + 4) % 32]  # another clip of the same speaker as the reference
        t = text[clip.stem].split("|")[-1].replace('"', "'")
        rt = text[ref.stem].split("|")[-1].replace('"', "'")
        lines.append(f'{clip},"{t}",{spk},,,tts-{clip.stem}')
        lines.append(f'{clip},"{t}",{spk},{ref},"{rt}",clone-{clip.stem}')
    manifest = tmp_path / "voices.csv"
    manifest.write_text("\n".join(lines) + "\n")
    fractions = []
    for seed in range(4):
        cfg = with_data(tmp_config, manifest=manifest, data_root=lj_dir, val_fraction=0.25, split_seed=seed)
        cfg["results_dir"] = str(tmp_path / f"seed{seed}")
        summary = run(cfg)
        train, val, _, _ = outputs(cfg)
        assert summary["rows_kept"] == 64 and summary["split_by"] == "speaker" and val and train
        assert_held_out(train, val, by_speaker=True)
        s = summary["split"]
        assert (s["groups"], s["speakers_train"] + s["speakers_val"]) == (4, 4)
        assert len(val) == 16 and s["speakers_val"] == 1  # 4 speakers of 16 samples: 1/4 of them is val
        fractions.append(len(val) / 64)
    # by clip instead: the cloning references chain every speaker's clips into one group each
    cfg = with_data(tmp_config, manifest=manifest, data_root=lj_dir, val_fraction=0.25, split_by="clip")
    cfg["results_dir"] = str(tmp_path / "by-clip")
    summary = run(cfg)
    assert summary["split_by"] == "clip" and summary["split"]["groups"] == 4
    assert_held_out(*outputs(cfg)[:2])
    # a forced speaker split with one speaker cannot hold a speaker out
    one = tmp_path / "one.csv"
    one.write_text("\n".join(line.replace(",bo,", ",ada,").replace(",cyd,", ",ada,").replace(",dee,", ",ada,")
                             for line in lines) + "\n")
    cfg = with_data(tmp_config, manifest=one, data_root=lj_dir, split_by="speaker")
    cfg["results_dir"] = str(tmp_path / "one")
    with pytest.raises(mf.ManifestError, match="at least 2"):
        run(cfg)


def test_speaker_split_with_uneven_speakers_and_misc_speaker(tmp_config, tmp_path, lj_dir):
    """Speakers owning 1-12 single-clip TTS rows (ChatML, speaker in ``misc.speaker`` for some):
    speaker groups of unequal size, val still about data.val_fraction of the samples."""
    clips = sorted((lj_dir / "wavs").glob("*.wav"))
    owners = ["ann"] * 12 + ["ben"] * 8 + ["cat"] * 5 + ["dan"] * 3 + ["eve"] * 2 + ["fay", "gus"]
    rows = []
    for i, (clip, spk) in enumerate(zip(clips, owners)):
        row = mf.tts_sample(f"sentence {i}", str(clip), None, f"tts-{clip.stem}")
        if i % 2:
            row["speaker"] = spk
        else:
            row["misc"]["speaker"] = spk
        rows.append(row)
    manifest = tmp_path / "uneven.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for frac in (0.1, 0.2, 0.3):
        for seed in range(3):
            cfg = with_data(tmp_config, manifest=manifest, data_root=lj_dir, val_fraction=frac, split_seed=seed)
            cfg["results_dir"] = str(tmp_path / f"{frac}-{seed}")
            summary = run(cfg)
            train, val, _, _ = outputs(cfg)
            assert summary["split_by"] == "speaker" and summary["split"]["groups"] == 7
            assert_held_out(train, val, by_speaker=True)
            # groups of 1-12 of 32 samples make the split coarse: within 8 percentage points here
            assert abs(len(val) / 32 - frac) <= 0.08, (frac, seed, len(val))


# ------------------------------------------------------------------------------- the bad corpus
def test_bad_corpus_jsonl(tmp_config, corpus):
    cfg = corpus_config(tmp_config, corpus)
    summary = run(cfg)
    train, val, quarantine, fixes = outputs(cfg)
    kept = train + val
    expected = readme_expectations("manifest.jsonl")
    check_outcomes(expected, kept, quarantine, summary)
    assert fixes == summary and len(val) >= 1

    # counts in fixes.json are recounts of the rows
    recount: dict[str, int] = {}
    for r in kept:
        for f in r["misc"]["fixes"]:
            recount[f["kind"]] = recount.get(f["kind"], 0) + 1
    assert summary["fixes"] == recount
    assert summary["reasons"] == {r: sum(q["reason"] == r for q in quarantine) for r in summary["reasons"]}
    assert summary["warnings"] == {"silent_audio": 1}

    # quarantine keeps the original row (or the raw text when it did not parse)
    lines = (corpus / "manifest.jsonl").read_bytes().split(b"\n")
    for q in quarantine:
        if q["reason"] == "malformed_json":
            assert q["text"] == lines[q["line"] - 1].decode("utf-8", errors="replace")
        else:
            assert q["row"] == json.loads(lines[q["line"] - 1])

    by_id = {r["misc"]["id"]: r for r in kept}
    assert len(by_id) == len(kept)  # ids unique
    assert "good-tts-0008~2" in by_id and by_id["good-tts-0008"]["misc"]["source_line"] == 1
    assert by_id["silent"]["misc"]["warnings"] == ["silent_audio"]
    assert list(by_id["stereo-44k"]["misc"]["audio_info"].values())[0] == {
        "duration_s": pytest.approx(1.7834467, abs=1e-6), "sample_rate": 44100, "channels": 2}
    assert list(by_id["narrow-8k"]["misc"]["audio_info"].values())[0]["sample_rate"] == 8000
    assert [m["role"] for m in by_id["mixed-case-roles"]["messages"]] == ["system", "user", "assistant"]
    text = by_id["nfd-text"]["messages"][1]["content"]["text"]
    assert text == "The caf\u00e9 served d\u00e9j\u00e0 vu" and unicodedata.is_normalized("NFC", text)
    assert by_id["wrong-duration"]["messages"][2]["content"]["duration"] == pytest.approx(2.5845351, abs=1e-6)
    assert by_id["no-type"]["messages"][2]["content"]["type"] == "audio"
    assert by_id["good-list-content"]["misc"]["lang"] == "en" and by_id["good-list-content"]["speaker"] == "LJ"
    derived = [r for r in kept if r["misc"]["source_line"] == 13][0]["misc"]["id"]
    assert re.fullmatch(r"row-[0-9a-f]{16}", derived)
    assert by_id["windows-relative"]["messages"][2]["content"]["audio_url"] == str(corpus / "wavs" / "LJ001-0002.wav")

    # raw_audio: decoded, validated, stored content-addressed under the cache; rows only see audio_url
    raw = by_id["raw-audio-ok"]
    url = raw["messages"][2]["content"]["audio_url"]
    assert Path(url).parent == (Path(cfg["cache_dir"]) / "raw_audio").resolve()
    assert raw["misc"]["audio_sha256"][url] == Path(url).stem == audio_sha256(*load_audio(url))
    for r in kept:
        for _, _, item in audio_items(r):
            assert "raw_audio" not in item and os.path.isabs(item["audio_url"])
            assert item["audio_url"] in r["misc"]["audio_sha256"]

    # deterministic derived ids and outputs
    again = copy.deepcopy(cfg)
    again["results_dir"] = cfg["results_dir"] + "-again"
    run(again)
    assert outputs(again)[:3] == (train, val, quarantine)


def test_quarantine_fraction_limit(tmp_config, corpus, tmp_path):
    cfg = corpus_config(tmp_config, corpus, max_quarantine_fraction=0.05)
    with pytest.raises(mf.QuarantineTooLarge, match="quarantine.jsonl") as err:
        run(cfg)
    assert err.value.fraction > 0.5
    p = out_paths(cfg)
    assert all(f.exists() for f in p.values())
    summary = json.loads(p["fixes_out"].read_text())
    assert summary["rows_quarantined"] == len(read_jsonl(p["quarantine_out"])) == 30

    # the CLI as the manifest rule renders it: the config sections as JSON, every path explicit
    cli = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "higgs_tune.manifest",
         "--config-json", json.dumps({"data": cfg["data"], "cache_dir": str(tmp_path / "cache")}),
         "--train", str(cli / "train.jsonl"), "--val", str(cli / "val.jsonl"),
         "--quarantine", str(cli / "quarantine.jsonl"), "--fixes", str(cli / "fixes.json")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT / "workflow")}, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert "max_quarantine_fraction" in proc.stderr and str(cli / "quarantine.jsonl") in proc.stderr
    assert (cli / "train.jsonl").exists() and sorted(p.name for p in cli.iterdir()) == [
        "fixes.json", "quarantine.jsonl", "train.jsonl", "val.jsonl"]


# --------------------------------------------------------------------------- LJSpeech and CSV inputs
def test_ljspeech_metadata_converges_to_demo(tmp_config, tmp_path, lj_dir):
    run(tmp_config)
    demo = {r["misc"]["id"]: r for r in sum(outputs(tmp_config)[:2], [])}
    cfg = with_data(tmp_config, manifest=lj_dir / "metadata.csv", data_root=lj_dir)
    cfg["results_dir"] = str(tmp_path / "lj")
    summary = run(cfg)
    assert summary["format"] == "ljspeech" and summary["rows_kept"] == 32 and summary["rows_quarantined"] == 0
    train, val, _, _ = outputs(cfg)
    for row in train + val:
        twin = demo["tts-" + row["misc"]["id"]]
        assert row["messages"] == twin["messages"]
        assert row["misc"]["audio_sha256"] == twin["misc"]["audio_sha256"]


def test_bad_corpus_ljspeech_and_csv(tmp_config, corpus):
    for name, section in (("metadata.csv", "metadata.csv"), ("manifest.csv", "manifest.csv")):
        cfg = corpus_config(tmp_config, corpus, name)
        cfg["experiment"] = name.replace(".", "_")
        summary = run(cfg)
        train, val, quarantine, _ = outputs(cfg)
        check_outcomes(readme_expectations(section), train + val, quarantine, summary)
        assert summary["format"] == ("ljspeech" if name == "metadata.csv" else "csv")
        for row in train + val:
            msgs = row["messages"]
            if row.get("start_index") == 4:
                assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
                assert msgs[0]["content"]["text"] == mf.CLONE_SYSTEM_PROMPT
            else:
                assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
                assert msgs[0]["content"]["text"] == mf.TTS_SYSTEM_PROMPT
        if name == "manifest.csv":
            by_line = {r["misc"]["source_line"]: r for r in train + val}
            assert by_line[3]["start_index"] == 4 and by_line[3]["speaker"] == "LJ"
            assert by_line[5]["messages"][1]["content"]["text"] == "has never been\nsurpassed."


def test_tsv_uses_data_root_and_json_list(tmp_config, corpus, tmp_path):
    # TSV elsewhere: paths relative to data_root, not to the manifest's folder
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.tsv").write_text(
        "audio\ttext\tspeaker\nwavs/LJ001-0008.wav\thas never been surpassed.\tLJ\n\n"
        "wavs/LJ001-0013.wav\tthan in the same operations with ugly ones.\tLJ\n")
    cfg = with_data(tmp_config, manifest=elsewhere / "manifest.tsv", data_root=corpus, format="auto")
    summary = run(cfg)
    assert (summary["format"], summary["rows_kept"], summary["rows_in"]) == ("csv", 2, 2)
    rows = sum(outputs(cfg)[:2], [])
    assert {r["misc"]["source_line"] for r in rows} == {2, 4}
    assert all(r["messages"][2]["content"]["audio_url"].startswith(str(corpus / "wavs")) for r in rows)

    # JSON list: line = index + 1
    good = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text(errors="replace").splitlines()[:4]]
    (corpus / "list.json").write_text(json.dumps(good[:2] + ["not a sample"] + good[2:]))
    cfg = corpus_config(tmp_config, corpus, "list.json")
    cfg["experiment"] = "json_list"
    summary = run(cfg)
    train, val, quarantine, _ = outputs(cfg)
    assert (summary["rows_in"], summary["rows_kept"]) == (5, 4)
    assert [(q["line"], q["reason"], q["row"]) for q in quarantine] == [(3, "schema_violation", "not a sample")]
    assert {r["misc"]["source_line"] for r in train + val} == {1, 2, 4, 5}


def test_paths_resolve_against_the_manifest_folder_and_data_root_confines(tmp_config, tmp_path, lj_dir):
    """Without data_root (the demo config's default): relative paths resolve against the manifest's
    folder, absolute paths are taken as they are, a symlink out is followed. With data_root set, the
    same manifest keeps only the row inside it and says why for the others."""
    assert tmp_config["data"]["data_root"] is None
    outside = tmp_path / "my_data"
    (outside / "clips").mkdir(parents=True)
    shutil.copy(lj_dir / "wavs" / "LJ001-0002.wav", outside / "clips" / "a.wav")
    (outside / "clips" / "link.wav").symlink_to(lj_dir / "wavs" / "LJ001-0030.wav")
    rows = [{"audio": "clips/a.wav", "text": "in being comparatively modern."},
            {"audio": str(lj_dir / "wavs" / "LJ001-0024.wav"), "text": "absolute and elsewhere"},
            {"audio": "clips/link.wav", "text": "a symlink out of the folder"},
            {"audio": "clips/absent.wav", "text": "missing"}]
    (outside / "manifest.csv").write_text("audio,text\n" + "".join(f"{r['audio']},{r['text']}\n" for r in rows))
    cfg = with_data(tmp_config, manifest=outside / "manifest.csv", max_quarantine_fraction=1.0)
    summary = run(cfg)
    train, val, quarantine, _ = outputs(cfg)
    assert (summary["rows_kept"], summary["reasons"]) == (3, {"missing_file": 1})
    assert [q["line"] for q in quarantine] == [5] and str(outside / "clips" / "absent.wav") in quarantine[0]["message"]
    urls = {r["messages"][2]["content"]["audio_url"] for r in train + val}
    assert urls == {str(outside / "clips" / "a.wav"), str(lj_dir / "wavs" / "LJ001-0024.wav"),
                    str(outside / "clips" / "link.wav")}
    assert set(map(str, mf.referenced_audio(outside / "manifest.csv", cfg["data"]))) == urls

    confined = with_data(cfg, data_root=outside)
    confined["experiment"] = "confined"
    summary = run(confined)
    _, _, quarantine, _ = outputs(confined)
    assert summary["rows_kept"] == 1
    assert {q["line"]: q["reason"] for q in quarantine} == {3: "path_escapes_root", 4: "path_escapes_root",
                                                            5: "missing_file"}
    assert all("data_root" in q["message"] for q in quarantine if q["reason"] == "path_escapes_root")
    assert mf.referenced_audio(outside / "manifest.csv", confined["data"]) == [outside / "clips" / "a.wav"]


def test_whole_file_errors(tmp_config, tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"messages": []},')
    with pytest.raises(mf.ManifestError, match="not a valid JSON list"):
        run(with_data(tmp_config, manifest=bad, data_root=tmp_path))
    nohead = tmp_path / "m.csv"
    nohead.write_text("path,transcript\nx.wav,hello\n")
    with pytest.raises(mf.ManifestError, match="audio"):
        run(with_data(tmp_config, manifest=nohead, data_root=tmp_path, format="csv"))


# ----------------------------------------------------------------------- kept rows train downstream
def test_kept_rows_build_dataset_samples_and_collate(tmp_config, corpus, text_tokenizer):
    run(tmp_config)
    rows = sum(outputs(tmp_config)[:2], [])
    for name in ("manifest.jsonl", "manifest.csv"):
        cfg = corpus_config(tmp_config, corpus, name)
        cfg["experiment"] = name.replace(".", "_")
        run(cfg)
        rows += sum(outputs(cfg)[:2], [])
    assert len(rows) == 40 + 16 + 4

    def fake_codes(sha: str) -> torch.Tensor:  # (K=8, T) in [0, 1024), T from the hash
        g = torch.Generator().manual_seed(int(sha[:8], 16))
        return torch.randint(0, 1024, (8, 3 + int(sha[8], 16)), generator=g)

    samples = []
    for row in rows:
        sample = build_dataset_sample(row, text_tokenizer, fake_codes)
        samples.append(sample)
        n_audio = len(audio_items(row))
        assert sample.input_ids.shape == sample.label_ids.shape
        assert sample.audio_ids_start.numel() == n_audio and sample.audio_ids_concat.shape[0] == 8
        expected_t = sum(fake_codes(row["misc"]["audio_sha256"][c["audio_url"]]).shape[1]
                         for _, _, c in audio_items(row))
        assert sample.audio_ids_concat.shape[1] == expected_t
        assert (sample.label_ids != -100).any()  # something to learn
        assert (sample.input_ids == 128016).sum() == sum(r == "assistant" for _, r, _ in audio_items(row))

    # and the upstream collator batches them (audio-stream BOS/EOS, delay pattern, audio labels)
    collator = make_collator(tiny_higgs_config(tmp_config["model"]["arch"]))
    for i in range(0, len(samples), 16):
        batch = collator(samples[i:i + 16])
        assert batch.input_ids.shape[0] == len(samples[i:i + 16])
        assert batch.label_audio_ids.shape[0] == 8 and (batch.label_audio_ids != -100).any()


def test_kept_rows_satisfy_the_row_schema_file(tmp_config, corpus):
    """Every row the stage keeps, from the demo and from the bad-input corpus (fixed rows included),
    is valid against workflow/schemas/chatml_row.schema.yaml read independently here; the stage's
    roles and audio keys are the file's; a normalized row the file refuses is quarantined with the
    JSON path of the violation."""
    import jsonschema
    import yaml

    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "chatml_row.schema.yaml").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for cfg in (tmp_config, corpus_config(tmp_config, corpus)):
        run(cfg)
        train, val, _, _ = outputs(cfg)
        assert train and val
        for row in train + val:
            assert not list(validator.iter_errors(row)), row["misc"]["id"]
    assert mf.ROLES == tuple(schema["properties"]["messages"]["items"]["properties"]["role"]["enum"])
    assert mf.AUDIO_KEYS == set(schema["$defs"]["audio"]["properties"])
    row = {"messages": [{"role": "user", "content": "Hi."},
                        {"role": "assistant", "content": {"type": "audio", "audio_url": "a.wav", "duration": 1.5}}]}
    assert mf.normalize_structure(row, [])["messages"][1]["content"]["duration"] == 1.5
    # the file is the contract: a schema narrowed to integer durations refuses a row the code would keep
    narrowed = copy.deepcopy(schema)
    narrowed["$defs"]["audio"]["properties"]["duration"] = {"type": "integer"}
    from higgs_tune.manifest import chatml

    saved = chatml.ROW_VALIDATOR
    chatml.ROW_VALIDATOR = jsonschema.Draft202012Validator(narrowed)
    try:
        with pytest.raises(mf.Reject) as err:
            mf.normalize_structure(row, [])
    finally:
        chatml.ROW_VALIDATOR = saved
    assert err.value.reason == "schema_violation" and err.value.field == "messages[1].content"
