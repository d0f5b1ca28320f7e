"""The manifest stage: any supported input -> one validated Higgs ChatML JSONL, split train/val.

One file per job: :mod:`.readers` (the formats), :mod:`.chatml` (normalization; the normalized row
is checked against ``workflow/schemas/chatml_row.schema.yaml``), :mod:`.audio` (paths, probing,
raw audio), :mod:`.split` (train/val), :mod:`.cloning` (voice-cloning pairs), :mod:`.run` (the stage
and its CLI); :mod:`.rows` holds the reasons, errors and row type they share. The names below are
re-exported here: ``from higgs_tune.manifest import run_manifest``.

Inputs (``data.manifest``, ``data.format``: ``auto`` or one of :data:`FORMATS`, told by
:func:`detect_format`):

* ``chatml``: Higgs ChatML JSONL (one ``ChatMLSample`` per line) or a JSON list of them; content
  may be a string, an item or a list of text/audio items in any turn.
* ``ljspeech``: LJSpeech ``metadata.csv``: ``id|text[|normalized]`` (no header, no quoting), audio at
  ``wavs/{id}.wav`` beside it. The ``normalized`` column wins when it is non-empty.
* ``csv``: CSV/TSV with a header ``audio,text[,speaker,ref_audio,ref_text,id,language]``: rows with
  ``ref_audio`` and ``ref_text`` become voice-cloning samples, the others plain TTS samples (the
  layouts and system prompts of ``data/demo/manifest.jsonl``).
* ``train_higgs_audio``: a JimmyMa99/train-higgs-audio folder (``metadata.json`` or ``X.wav`` +
  ``X.txt`` pairs) or its ``metadata.json`` (:func:`read_train_higgs_audio`).
* ``ms_swift``: ms-swift JSONL ``{"messages": [...], "audios": [...]}`` (:func:`read_ms_swift`).
* ``raw_jsonl``: ``{"audio", "text"[, "ref_audio", "ref_text", "speaker", "language", "id"]}`` per
  line (:func:`read_raw_jsonl`).

Fields a reader does not map are kept in ``misc.extra``; a row's language (``language`` of any
format) is checked and kept in ``misc.language`` (:func:`carry_language`). With
``data.cloning.enabled``, voice-cloning pairs are built from the rows naming a speaker, within each
side of the split (:func:`build_cloning`; ``fixes.json`` ``cloning``).

Every row ends up in exactly one place: ``manifest/train.jsonl`` or ``manifest/val.jsonl`` (kept,
possibly fixed; each fix recorded in ``misc.fixes``) or ``manifest/quarantine.jsonl`` (with a
``reason`` code, a ``message`` saying what to do, the source ``line`` and the original ``row``).
``manifest/fixes.json`` counts rows, fixes, warnings and reasons. Blank lines are not rows.

Held out means held out: the train/val split never puts one audio clip (as target or as
voice-cloning reference) on both sides, nor, when the rows name two or more speakers, one speaker
(:func:`split_groups`, ``data.split_by``); val holds about ``data.val_fraction`` of the samples,
chosen from ``data.split_seed`` (:func:`assign_splits`). ``fixes.json`` records how (``split_by``,
``split``).
A quarantined ``row`` is the parsed JSON for ChatML, ``{column: value}`` for CSV and
``{"fields": [...]}`` for LJSpeech (or a CSV record whose field count is off); ``text`` replaces it
when the line did not parse.

Fix kinds (``misc.fixes[*].kind``): ``path_resolved``, ``windows_path``, ``role_normalized``,
``string_content``, ``content_type_added``, ``text_nfc``, ``text_whitespace``, ``derived_id``,
``id_from_top_level``, ``id_stringified``, ``duplicate_id_renamed``, ``duration_measured``,
``duration_corrected``, ``raw_audio_extracted``.

Quarantine reasons: see :data:`REASONS`. Warning kinds (kept rows, ``misc.warnings``):
``silent_audio`` (peak below -60 dBFS; kept because silence is valid audio, the audit decides).

CLI (as ``workflow/rules/manifest.smk`` renders it)::

    python -m higgs_tune.manifest --configfile config/demo.yaml --train T.jsonl --val V.jsonl \
        --quarantine Q.jsonl --fixes fixes.json

exits 1 when the quarantined fraction exceeds ``data.max_quarantine_fraction`` (all outputs are
written first).
"""

from __future__ import annotations

from .rows import (  # noqa: F401
    AUDIO_KEYS, CLONE_SYSTEM_PROMPT, REASONS, ROLES, ROW_SCHEMA, ROW_SCHEMA_PATH, SILENCE_PEAK, TTS_SYSTEM_PROMPT,
    WINDOWS_ABSOLUTE, ManifestError, QuarantineTooLarge, Reject, SourceRow,
)
from .readers import (  # noqa: F401
    FORMATS, PAIR_AUDIO_SUFFIXES, PAIR_KEYS, SWIFT_AUDIO_TAG, THA_KEYS, clone_sample, detect_format,
    input_digest, manifest_folder, read_chatml, read_csv_manifest, read_ljspeech, read_ms_swift,
    read_raw_jsonl, read_rows, read_train_higgs_audio, scene_system_prompt, tts_sample,
)
from .chatml import (  # noqa: F401
    LANGUAGE_RE, add_fix, audio_refs, canonical_json, carry_language, content_items, derived_id,
    normalize_structure, normalize_text, resolve_id, schema_reject,
)
from .audio import (  # noqa: F401
    data_root, extract_raw_audio, probe_audio, referenced_audio, resolve_audio_path,
)
from .split import (  # noqa: F401
    SPLIT_BY, assign_splits, sample_speaker, split_groups, split_summary, split_value,
)
from .cloning import (  # noqa: F401
    build_cloning,
)
from .run import (  # noqa: F401
    main, run_manifest,
)

__all__ = [
    "AUDIO_KEYS", "CLONE_SYSTEM_PROMPT", "FORMATS", "LANGUAGE_RE", "ManifestError", "PAIR_AUDIO_SUFFIXES",
    "PAIR_KEYS", "QuarantineTooLarge", "REASONS", "ROLES", "ROW_SCHEMA", "ROW_SCHEMA_PATH", "Reject", "SILENCE_PEAK", "SPLIT_BY", "SWIFT_AUDIO_TAG",
    "SourceRow", "THA_KEYS", "TTS_SYSTEM_PROMPT", "WINDOWS_ABSOLUTE", "add_fix", "assign_splits",
    "audio_refs", "build_cloning", "canonical_json", "carry_language", "clone_sample", "content_items",
    "data_root", "derived_id", "detect_format", "extract_raw_audio", "input_digest", "main",
    "manifest_folder", "normalize_structure", "normalize_text", "probe_audio", "read_chatml",
    "read_csv_manifest", "read_ljspeech", "read_ms_swift", "read_raw_jsonl", "read_rows",
    "read_train_higgs_audio", "referenced_audio", "resolve_audio_path", "resolve_id", "run_manifest",
    "sample_speaker", "scene_system_prompt", "schema_reject", "split_groups", "split_summary", "split_value",
    "tts_sample",
]
