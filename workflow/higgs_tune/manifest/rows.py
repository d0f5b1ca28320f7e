"""Row types of the manifest stage: the quarantine reasons, the errors, one input row, the demo's system prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: The normalized row's JSON Schema (``workflow/schemas/chatml_row.schema.yaml``, beside the config's):
#: :func:`higgs_tune.manifest.chatml.normalize_structure` checks every kept row against it.
ROW_SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "chatml_row.schema.yaml"
ROW_SCHEMA: dict = yaml.safe_load(ROW_SCHEMA_PATH.read_text())
#: Message roles of a Higgs ChatML row (the schema's ``role`` enum).
ROLES: tuple[str, ...] = tuple(ROW_SCHEMA["properties"]["messages"]["items"]["properties"]["role"]["enum"])
#: Keys an audio content item may have (the schema's ``$defs.audio``).
AUDIO_KEYS: frozenset[str] = frozenset(ROW_SCHEMA["$defs"]["audio"]["properties"])

#: System prompts of ``data/demo/manifest.jsonl`` (TTS rows, voice-cloning rows).
TTS_SYSTEM_PROMPT = (
    "Generate audio following instruction.\n\n<|scene_desc_start|>\nAudio is recorded from a quiet room.\n"
    "<|scene_desc_end|>"
)
CLONE_SYSTEM_PROMPT = "Generate audio following instruction."

#: Quarantine reason codes and what they mean.
REASONS: dict[str, str] = {
    "malformed_json": "the line is not valid JSON (or not UTF-8)",
    "schema_violation": "the row does not have the ChatMLSample / CSV shape (the `field` key names where)",
    "missing_file": "an audio path resolves to no file",
    "undecodable_audio": "libsndfile cannot decode the audio, it is truncated, or holds NaN/inf",
    "zero_length_audio": "the audio file is empty or holds no samples",
    "duration_out_of_range": "an audio clip lasts less than data.min_duration_s or more than data.max_duration_s",
    "empty_transcript": "a text item is empty after whitespace normalization",
    "no_assistant_audio": "no assistant audio at/after start_index: nothing to learn",
    "path_escapes_root": "an audio path leaves data.data_root when it is set (.., absolute elsewhere, symlink out, Windows drive)",
    "invalid_base64": "raw_audio is not valid base64",
    "unsupported_role": "a role other than system/user/assistant",
    "duplicate": "exact duplicate (same id, same content) of an earlier kept row",
}
SILENCE_PEAK = 10 ** (-60 / 20)  # -60 dBFS
WINDOWS_ABSOLUTE = re.compile(r"^(?:[A-Za-z]:[\\/]|\\\\)")


class ManifestError(ValueError):
    """The input as a whole is unusable (unknown format, CSV header lacks columns, no rows, ...)."""


class QuarantineTooLarge(ManifestError):
    """More than ``data.max_quarantine_fraction`` of the rows were quarantined (outputs are written)."""

    def __init__(self, message: str, fraction: float, quarantine_path: Path):
        super().__init__(message)
        self.fraction = fraction
        self.quarantine_path = quarantine_path


class Reject(Exception):
    """One row goes to quarantine: ``reason`` (a :data:`REASONS` key), ``message``, ``field``."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


@dataclass
class SourceRow:
    """One input row: its 1-based ``line``, the ``original`` as read (or raw ``text`` when it did
    not parse), the ChatML ``sample`` built from it, or the ``error`` that already rejects it."""

    line: int
    original: Any = None
    text: str | None = None
    sample: Any = None
    error: Reject | None = None
    fixes: list[dict] = field(default_factory=list)
