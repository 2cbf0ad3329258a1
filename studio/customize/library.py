"""The learned concepts in the history, and the operations the Customize tab offers on them."""
from __future__ import annotations

from dataclasses import dataclass

from ..edits import Edit, toggled
from ..errors import StudioError
from . import compose as methods
from .concept import with_strength

COMPOSITIONS = ("merge", "adapters")


@dataclass
class LearnedConcept:
    index: int  # 1-based history position
    token: str
    method: str
    strength: float
    on: bool

    @property
    def title(self) -> str:
        return f"#{self.index} {self.token} ({self.method}{'' if self.on else ', off'})"


def concept_of(edit: Edit) -> Edit | None:
    """The learned_concept inside an entry's edit (also when it is switched off)."""
    edit = toggled(edit) if edit.kind == "off" else edit
    return edit if edit.kind == "learned_concept" else None


def learned_concepts(manager) -> list[LearnedConcept]:
    return [LearnedConcept(i, c.params.get("token") or c.params.get("name", "adapter"), c.params.get("method", "?"),
                           c.params.get("strength", 1.0), entry.edit.kind == "learned_concept")
            for i, entry in enumerate(manager.stack.applied, 1) if (c := concept_of(entry.edit)) is not None]


def concept_edit(manager, index: int) -> Edit:
    index = int(index)
    if not 1 <= index <= manager.stack.position:
        raise StudioError(f"edit #{index} is not applied")
    concept = concept_of(manager.stack.entries[index - 1].edit)
    if concept is None:
        raise StudioError(f"edit #{index} is not a learned concept")
    return concept


def set_strength(manager, index: int, strength: float | None = None, scope: str | None = None):
    """Re-apply concept `index` at `strength` and/or `scope`; later edits are re-applied."""
    with manager.lock:
        return manager.replace(index, with_strength(concept_edit(manager, index), strength, scope))


def compose(manager, indices: list[int], how: str, weights: list[float] | None = None,
            reg_prompts: list[str] | None = None):
    """Replace concepts `indices` by one "merge" or "adapters" edit; their entries are switched off first (their
    tokens would exist twice), and back on if it fails."""
    if how not in COMPOSITIONS:
        raise StudioError(f"unknown composition {how!r}: choose one of {', '.join(COMPOSITIONS)}")
    indices = sorted({int(i) for i in indices})
    if len(indices) < 2:
        raise StudioError("pick at least two learned concepts to compose")
    with manager.job():
        concepts = [concept_edit(manager, i) for i in indices]
        switched = []
        try:
            for i in indices:
                if manager.stack.entries[i - 1].edit.kind == "learned_concept":
                    manager.toggle(i)
                    switched.append(i)
            if how == "merge":
                return manager.apply(methods.merge_edit(manager.pipe, concepts, reg_prompts))
            return manager.apply(methods.adapters_edit(concepts, weights or [1.0] * len(concepts)))
        except BaseException:
            for i in switched:
                manager.toggle(i)
            raise
