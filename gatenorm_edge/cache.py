"""Cache entries that cannot lie: every cached result (calibration text, fitted patches, speed model, zero-shot
rows) is stored sealed, as JSON holding the program that wrote it and the sha256 of its payload (arrays: of the
``.npz`` beside it).

An entry that is truncated, bit-flipped or written by another version of the program fails its seal: it is
reported in one line on stderr, removed, and rebuilt by its caller, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .fileio import atomic_output, write_text_atomic

PROGRAM = f"gatenorm-edge {__version__}"
SEAL_FORMAT = 1


class DamagedEntry(ValueError):
    """A cache entry whose seal does not hold; the message says how."""


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(payload: Any) -> str:
    """``payload`` (JSON-able) as one line of JSON that can prove itself (digested as it reads back: integer
    keys become strings)."""
    payload = json.loads(json.dumps(payload))
    return json.dumps({"program": PROGRAM, "format": SEAL_FORMAT, "sha256": _digest(payload), "payload": payload},
                      separators=(",", ":"))


def unseal(text: str) -> Any:
    """The payload of a sealed entry; ``DamagedEntry`` when it is cut short, altered or another program's."""
    try:
        entry = json.loads(text)
        program, stored, payload = entry["program"], entry["sha256"], entry["payload"]
        if entry["format"] != SEAL_FORMAT:
            raise DamagedEntry(f"seal format {entry['format']!r}, not {SEAL_FORMAT}")
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedEntry(exc.args[0] if isinstance(exc, DamagedEntry) else "truncated or not a sealed entry") from None
    if program != PROGRAM:
        raise DamagedEntry(f"written by {program}, this is {PROGRAM}")
    if stored != _digest(payload):
        raise DamagedEntry("its checksum does not match its contents")
    return payload


def report_damage(what: str, path: Path, reason: str, action: str = "rebuilding it") -> None:
    """The one line a damaged entry gets, on stderr."""
    print(f"warning: {what} cache entry {path} is damaged ({reason}); {action}", file=sys.stderr, flush=True)


def read_entry(path: Path, what: str) -> Any | None:
    """The payload sealed at ``path``; None when there is none, or when it is damaged (then reported and removed)."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    try:
        return unseal(text)
    except DamagedEntry as exc:
        report_damage(what, path, str(exc))
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()
        return None


def write_entry(path: Path, payload: Any) -> None:
    """Seal ``payload`` into ``path`` atomically (never half an entry), creating its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(path), seal(payload) + "\n")


def write_arrays(path: Path, meta: Any, arrays: dict[str, np.ndarray]) -> None:
    """Seal ``meta`` (JSON-able) and the ``arrays`` beside it: ``path`` (``.npz``, written atomically) and
    ``path`` + ``.json``, the sealed entry holding ``meta`` and the npz's sha256 (written last)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(Path(path)) as handle:
        handle.write(data)
    write_entry(Path(f"{path}.json"), {"meta": meta, "arrays_sha256": hashlib.sha256(data).hexdigest()})


def read_arrays(path: Path, what: str) -> tuple[Any, dict[str, np.ndarray]] | None:
    """What ``write_arrays`` wrote at ``path``; None when absent or damaged (then reported and removed)."""
    entry = read_entry(Path(f"{path}.json"), what)
    if entry is None:
        return None
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        data = b""
    if hashlib.sha256(data).hexdigest() != entry["arrays_sha256"]:
        report_damage(what, Path(path), "its arrays do not match their checksum")
        for stale in (Path(path), Path(f"{path}.json")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        return None
    with np.load(io.BytesIO(data)) as stored:
        return entry["meta"], {name: stored[name] for name in stored.files}
