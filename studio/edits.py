"""The edit stack: an Edit (kind, JSON parameters, input tensors) changes the model only through a Patch,
which keeps the original and the result of every tensor it writes (on CPU) and every attribute it swaps:
undo and redo copy them back, never subtract a delta, so any apply/undo/redo sequence is bit-exact."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import EditError, JobStopped, StudioError

COMPONENTS = ("text_encoder", "unet", "vae")

ApplyFn = Callable[[Any, dict, dict, "Patch"], None]
EDIT_KINDS: dict[str, ApplyFn] = {}


def edit_kind(name: str):
    """Register `fn(pipe, params, tensors, patch)` as the way to apply edits of kind `name`."""

    def register(fn: ApplyFn) -> ApplyFn:
        EDIT_KINDS[name] = fn
        return fn

    return register


@dataclass(frozen=True)
class Edit:
    """What to change: enough to re-apply it after a restart or to another model of the same architecture."""

    kind: str
    params: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.kind


def find_tensor(pipe, name: str) -> torch.Tensor:
    """Resolve 'unet.down_blocks.0....weight' to the live parameter of the pipeline."""
    component, _, rest = name.partition(".")
    module = getattr(pipe, component, None) if component in COMPONENTS else None
    if module is None:
        raise StudioError(f"unknown tensor {name!r}: names start with one of {', '.join(COMPONENTS)}")
    try:
        return module.get_parameter(rest)
    except AttributeError:
        raise StudioError(f"unknown tensor {name!r}: {component} has no parameter {rest!r}") from None


def module_slot(pipe, name: str) -> tuple[Any, str, Any]:
    """(parent, attribute, module) of the layer owning weight `name` ('unet.….to_k.weight')."""
    component, _, rest = name.partition(".")
    root = getattr(pipe, component, None) if component in COMPONENTS else None
    if root is None or not rest.endswith(".weight"):
        raise StudioError(f"{name!r} is not a layer weight of this pipeline")
    path = rest.removesuffix(".weight")
    parent_path, _, attr = path.rpartition(".")
    try:
        parent = root.get_submodule(parent_path)
        return parent, attr, getattr(parent, attr)
    except AttributeError:
        raise StudioError(f"{name!r}: this model has no layer {path!r} (another architecture?)") from None


def named_tensors(pipe) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p for c in COMPONENTS if getattr(pipe, c, None) is not None
            for n, p in getattr(pipe, c).named_parameters()}


_ABSENT = object()


class Patch:
    def __init__(self, pipe):
        self.pipe = pipe
        self.originals: dict[str, torch.Tensor] = {}
        self.results: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}
        self._swaps: list[tuple[Any, str, Any, Any]] = []

    def read(self, name: str) -> torch.Tensor:
        return find_tensor(self.pipe, name)

    def write(self, name: str, value: torch.Tensor) -> None:
        """Copy `value` into parameter `name` in place (backing up its original on first touch)."""
        live = self._live[name] if name in self._live else find_tensor(self.pipe, name)
        if tuple(value.shape) != tuple(live.shape):
            raise StudioError(f"{name}: new value has shape {tuple(value.shape)}, the model has {tuple(live.shape)}")
        value = value.detach().to(device=live.device, dtype=live.dtype)
        if not torch.isfinite(value).all():
            raise EditError(f"{name}: the edit produced NaN or infinite values (a diverging solve?)")
        if name not in self.originals:
            self.originals[name] = live.detach().to("cpu", copy=True)
            self._live[name] = live
        with torch.no_grad():
            live.copy_(value)

    def set_attr(self, obj: Any, attr: str, value: Any) -> None:
        """Swap an attribute (module, processor, tokenizer); undo puts the old one back (or removes a new one)."""
        self._swaps.append((obj, attr, getattr(obj, attr, _ABSENT), value))
        setattr(obj, attr, value)

    def seal(self) -> None:
        """Record the written results once the edit's function has finished."""
        self.results = {n: t.detach().to("cpu", copy=True) for n, t in self._live.items()}

    def undo(self) -> None:
        with torch.no_grad():
            for name, original in self.originals.items():
                self._live[name].copy_(original)
        for obj, attr, old, _ in reversed(self._swaps):
            delattr(obj, attr) if old is _ABSENT else setattr(obj, attr, old)

    def redo(self) -> None:
        for obj, attr, _, new in self._swaps:
            setattr(obj, attr, new)
        with torch.no_grad():
            for name, result in self.results.items():
                self._live[name].copy_(result)

    @property
    def backup_bytes(self) -> int:
        """Host memory this patch holds (originals plus results)."""
        return sum(t.numel() * t.element_size() for d in (self.originals, self.results) for t in d.values())


@edit_kind("off")
def _switched_off(pipe, params, tensors, patch) -> None:
    """An edit switched off in the history: it keeps its place and its data but changes nothing."""


def toggled(edit: Edit) -> Edit:
    """The edit switched off (kind "off", the original kept inside), or an "off" edit switched back on."""
    if edit.kind == "off":
        p = edit.params
        return Edit(p["kind"], p["params"], edit.tensors, label=p.get("label", ""))
    return Edit("off", {"kind": edit.kind, "params": edit.params, "label": edit.label}, edit.tensors,
                label=f"(off) {edit.title}")


@dataclass
class Entry:
    edit: Edit
    patch: Patch
    serial: int = field(default_factory=itertools.count().__next__)  # unique for the process's lifetime


class EditStack:
    """A linear history of applied edits over one pipeline, with a redo tail."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.entries: list[Entry] = []
        self.position = 0  # entries[:position] are applied

    @property
    def applied(self) -> list[Entry]:
        return self.entries[: self.position]

    def apply(self, edit: Edit) -> Entry:
        """Apply atomically: on any failure, restore what was touched and raise a clear error."""
        fn = EDIT_KINDS.get(edit.kind)
        if fn is None:
            raise StudioError(f"unknown edit kind {edit.kind!r}; known: {', '.join(sorted(EDIT_KINDS))}")
        patch = Patch(self.pipe)
        try:
            fn(self.pipe, dict(edit.params), dict(edit.tensors), patch)
            patch.seal()
        except BaseException as exc:
            patch.undo()
            if isinstance(exc, (StudioError, JobStopped)) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise EditError(f"{edit.title}: out of memory (rolled back): try a smaller batch") from exc
            raise EditError(f"{edit.title} failed and was rolled back: {exc}") from exc
        del self.entries[self.position:]
        entry = Entry(edit, patch)
        self.entries.append(entry)
        self.position += 1
        return entry

    def undo(self) -> Entry | None:
        if self.position == 0:
            return None
        self.position -= 1
        entry = self.entries[self.position]
        entry.patch.undo()
        return entry

    def redo(self) -> Entry | None:
        if self.position == len(self.entries):
            return None
        entry = self.entries[self.position]
        entry.patch.redo()
        self.position += 1
        return entry

    def goto(self, position: int) -> None:
        if not 0 <= position <= len(self.entries):
            raise StudioError(f"history position {position} is outside 0..{len(self.entries)}")
        while self.position > position:
            self.undo()
        while self.position < position:
            self.redo()

    def replace(self, index: int, edit: Edit) -> Entry:
        """Put `edit` in place of applied entry `index` (1-based), re-applying the later ones; all or nothing."""
        if not 1 <= index <= self.position:
            raise StudioError(f"edit #{index} is not applied (history has {self.position} applied)")
        old_entries, old_position = list(self.entries), self.position
        later = [e.edit for e in self.entries[index:self.position]]
        self.goto(index - 1)
        del self.entries[index - 1:]
        try:
            entry = self.apply(edit)
            for e in later:
                self.apply(e)
        except BaseException:
            self.goto(index - 1)
            self.entries[:] = old_entries
            self.goto(old_position)
            raise
        self.entries.extend(old_entries[old_position:])
        return entry

    def rows(self) -> list[dict]:
        """The history as the UI and CLI show it."""
        return [dict(index=i + 1, edit=e.edit.title, kind=e.edit.kind, params=json.dumps(e.edit.params, sort_keys=True),
                     applied=i < self.position, backup_mb=round(e.patch.backup_bytes / 2**20, 3))
                for i, e in enumerate(self.entries)]
