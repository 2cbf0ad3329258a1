"""Edit files: edits (kind, parameters, input tensors, digests of what they changed) in one .safetensors.
Loading re-applies them, so a file works after a restart and on another model of the same architecture."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import write_atomically
from .edits import Edit, Entry, named_tensors
from .errors import StudioError
from .fingerprint import tensor_digest

FORMAT = "concept-studio-edits"
VERSION = 1
MAX_EDITS, MAX_LABEL = 500, 200  # per file; characters of a label


@dataclass
class SavedEdit:
    edit: Edit
    original_digests: dict[str, str] = field(default_factory=dict)
    result_digests: dict[str, str] = field(default_factory=dict)


@dataclass
class EditFile:
    edits: list[SavedEdit]
    position: int  # how many of `edits` were applied; the rest could be redone


def save_edits(entries: list[Entry], path: str | Path, position: int | None = None, model: str = "") -> Path:
    """Save `entries`: applied edits, or with `position` a saved history (redo tail included, maybe empty)."""
    if not entries and position is None:
        raise StudioError("there are no applied edits to save")
    tensors, records = {}, []
    for i, entry in enumerate(entries):
        e = entry.edit
        tensors.update({f"{i}/{name}": t for name, t in e.tensors.items()})
        records.append(dict(kind=e.kind, label=e.label, params=e.params, tensors=sorted(e.tensors),
                            originals={n: tensor_digest(t) for n, t in entry.patch.originals.items()},
                            results={n: tensor_digest(t) for n, t in entry.patch.results.items()}))
    meta = {"format": FORMAT, "version": VERSION, "edits": json.dumps(records), "model": model,
            "position": len(entries) if position is None else position}
    return save_tensors(tensors, path, meta)


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write tensors and metadata (as text) as a .safetensors file, atomically (every file the studio writes)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {k: str(v) for k, v in (metadata or {}).items()}
    return write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_tensors(path: Path) -> tuple[dict, dict]:
    """(tensors by key, metadata) of a .safetensors file; a StudioError if it cannot be read."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise StudioError(f"{path.name} is not a readable safetensors file: {exc}") from None


def load_edits(path: str | Path) -> list[SavedEdit]:
    return load_edit_file(path).edits


def load_edit_file(path: str | Path) -> EditFile:
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"edit file not found: {path}")
    if path.suffix != ".safetensors":
        raise StudioError(f"{path.name}: edit files are .safetensors files saved by Concept Studio")
    tensors, meta = read_tensors(path)
    if meta.get("format") != FORMAT:
        raise StudioError(f"{path.name} is a safetensors file but not a Concept Studio edit file")
    version = meta.get("version", "0")  # metadata values are text; files without one predate versions
    if version not in [str(v) for v in range(VERSION + 1)]:
        raise StudioError(f"{path.name} was saved by a newer Concept Studio, or is damaged (format {version!r})")
    try:
        records, position = json.loads(meta["edits"]), int(meta.get("position", -1))
        if not isinstance(records, list) or len(records) > MAX_EDITS:
            raise ValueError(f"'edits' must be a list of at most {MAX_EDITS} edits")
        saved = [_saved_edit(r, i, tensors) for i, r in enumerate(records)]
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise StudioError(f"{path.name} is damaged or was not written by Concept Studio: {_reason(exc)}") from None
    if not 0 <= position <= len(saved):
        position = len(saved)
    return EditFile(saved, position)


def _reason(exc: Exception) -> str:
    if isinstance(exc, KeyError):
        return f"it has no {exc.args[0]!r} entry"
    return "its metadata is nested too deeply" if isinstance(exc, RecursionError) else str(exc) or type(exc).__name__


def _saved_edit(r, i: int, tensors: dict) -> SavedEdit:
    """One record of a file's metadata as a SavedEdit, every field of the type it must have."""
    if not isinstance(r, dict):
        raise ValueError(f"edit {i + 1} is not a record")
    kind, params, label, names = r["kind"], r["params"], r.get("label", ""), r["tensors"]
    digests = [r.get("originals", {}), r.get("results", {})]
    if not (isinstance(kind, str) and isinstance(params, dict) and isinstance(label, str) and isinstance(names, list)
            and all(isinstance(d, dict) and all(isinstance(v, str) for v in d.values()) for d in digests)):
        raise ValueError(f"edit {i + 1} has fields of the wrong type")
    if len(label) > MAX_LABEL:
        raise ValueError(f"edit {i + 1}'s label is {len(label):,} characters (at most {MAX_LABEL})")
    return SavedEdit(Edit(kind, params, {n: tensors[f"{i}/{n}"] for n in names}, label), *digests)


def backup_estimate(pipe, saved: list[SavedEdit]) -> int:
    """Bytes the edits' undo backups will take (original and result of each tensor the file says they change)."""
    sizes = {n: p.numel() * p.element_size() for n, p in named_tensors(pipe).items()}
    return 2 * sum(sizes.get(n, 0) for s in saved for n in s.original_digests)


def backup_budget() -> int:
    """Half of the memory free now: what loading edits may take for their backups."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX
        return 4 * 2**30
