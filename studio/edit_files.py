"""Edit files: a stack of edits saved as one .safetensors (input tensors) with JSON metadata.

A file records each edit's kind, parameters and input tensors, plus digests of the tensors it
read and wrote. Loading re-applies the edits with their kinds' functions, so the same file
works on the same model after a restart (same digests, same fingerprint) and on another model
of the same architecture (the closed forms are recomputed there, as SPM transfers adapters).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .checks import write_atomically
from .edits import Edit, Entry
from .errors import StudioError
from .fingerprint import tensor_digest

FORMAT = "concept-studio-edits"
VERSION = 1


@dataclass
class SavedEdit:
    edit: Edit
    original_digests: dict[str, str] = field(default_factory=dict)
    result_digests: dict[str, str] = field(default_factory=dict)


@dataclass
class EditFile:
    edits: list[SavedEdit]
    position: int  # how many of `edits` were applied; the rest could be redone
    model: str = ""  # the model source the history was made on ("" for plain edit files)


def save_edits(entries: list[Entry], path: str | Path, position: int | None = None, model: str = "") -> Path:
    """Save `entries`. A plain edit file holds applied edits; a saved history (`position` given)
    holds the whole stack, redo tail included, and may be empty."""
    if not entries and position is None:
        raise StudioError("there are no applied edits to save")
    tensors, records = {}, []
    for i, entry in enumerate(entries):
        e = entry.edit
        tensors.update({f"{i}/{name}": t for name, t in e.tensors.items()})
        records.append(dict(
            kind=e.kind, label=e.label, params=e.params, tensors=sorted(e.tensors),
            originals={n: tensor_digest(t) for n, t in entry.patch.originals.items()},
            results={n: tensor_digest(t) for n, t in entry.patch.results.items()},
        ))
    meta = {"format": FORMAT, "version": VERSION, "edits": json.dumps(records), "model": model,
            "position": len(entries) if position is None else position}
    return save_tensors(tensors, path, meta)


def save_tensors(tensors: dict, path, metadata: dict | None = None) -> Path:
    """Write tensors (CPU copies) and metadata (as text) as a .safetensors file, atomically: every file the
    studio writes goes through here."""
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
    if int(meta.get("version", 0)) > VERSION:
        raise StudioError(f"{path.name} was saved by a newer Concept Studio (format {meta['version']})")
    saved = []
    for i, r in enumerate(json.loads(meta["edits"])):
        edit = Edit(r["kind"], r["params"], {n: tensors[f"{i}/{n}"] for n in r["tensors"]}, r.get("label", ""))
        saved.append(SavedEdit(edit, r.get("originals", {}), r.get("results", {})))
    return EditFile(saved, int(meta.get("position", len(saved))), meta.get("model", ""))
