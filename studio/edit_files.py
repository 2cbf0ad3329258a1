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
from safetensors.torch import load_file, save_file

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


def save_edits(entries: list[Entry], path: str | Path) -> Path:
    path = Path(path)
    if not entries:
        raise StudioError("there are no applied edits to save")
    tensors, records = {}, []
    for i, entry in enumerate(entries):
        e = entry.edit
        for name, t in e.tensors.items():
            tensors[f"{i}/{name}"] = t.detach().to("cpu").contiguous()
        records.append(dict(
            kind=e.kind, label=e.label, params=e.params, tensors=sorted(e.tensors),
            originals={n: tensor_digest(t) for n, t in entry.patch.originals.items()},
            results={n: tensor_digest(t) for n, t in entry.patch.results.items()},
        ))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION), "edits": json.dumps(records)})
    tmp.replace(path)
    return path


def load_edits(path: str | Path) -> list[SavedEdit]:
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"edit file not found: {path}")
    if path.suffix != ".safetensors":
        raise StudioError(f"{path.name}: edit files are .safetensors files saved by Concept Studio")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise StudioError(f"{path.name} is not a readable safetensors file: {exc}") from None
    if meta.get("format") != FORMAT:
        raise StudioError(f"{path.name} is a safetensors file but not a Concept Studio edit file")
    if int(meta.get("version", 0)) > VERSION:
        raise StudioError(f"{path.name} was saved by a newer Concept Studio (format {meta['version']})")
    saved = []
    for i, r in enumerate(json.loads(meta["edits"])):
        edit = Edit(r["kind"], r["params"], {n: tensors[f"{i}/{n}"] for n in r["tensors"]}, r.get("label", ""))
        saved.append(SavedEdit(edit, r.get("originals", {}), r.get("results", {})))
    return saved
