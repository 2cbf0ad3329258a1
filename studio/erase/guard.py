"""Inference-time guard (SAFREE-like): project prompt tokens off a concept subspace. No weight changes.

A token triggers when its score along a concept direction (mean concept - neutral difference) exceeds `threshold`
x the concept word's own; from the first trigger on (CLIP's causal encoder spreads the concept) the part in the
concept subspace becomes neutral. A 'condition' steering slot: exact undo, but bypassable with the weights.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .. import steering
from ..edits import Edit, edit_kind
from ..checks import known
from ..errors import StudioError
from ..fingerprint import tensor_digest
from .text import concept_rows, templates_for

DEFAULTS = dict(templates="object", threshold=0.75, energy=0.9, max_rank=16)


def guard_edit(concepts: list[str] | str, **params) -> Edit:
    concepts = [concepts] if isinstance(concepts, str) else list(concepts)
    p = {**DEFAULTS, **params, "concepts": concepts}
    return Edit("erase_guard", p, label=f"guard {', '.join(map(repr, concepts))} (inference-time, bypassable)")


class ConceptGuard:
    """Cleans prompt embeddings: from the first trigger token on, the concept-subspace part becomes neutral."""

    def __init__(self, directions, thresholds, basis, centre):
        self.directions, self.thresholds, self.basis, self.centre = directions, thresholds, basis, centre

    def fingerprint(self) -> str:
        return "ConceptGuard:" + tensor_digest(torch.cat([self.directions.flatten(), self.basis.flatten()]))

    def condition(self, cond, plan):
        emb = cond.embeds
        basis, centre = self.basis.to(emb.device), self.centre.to(emb.device)
        x = emb.float()
        hit = ((x - centre) @ self.directions.to(emb.device).T > self.thresholds.to(emb.device)).any(-1)
        hit[:, 0] = False  # SOS never triggers; every token after a trigger is cleaned
        cleaned = x - ((x - centre) @ basis) @ basis.T
        return replace(cond, embeds=torch.where(hit.cummax(dim=1).values.unsqueeze(-1), cleaned, x).to(emb.dtype))


def build_guard(pipe, p: dict) -> ConceptGuard:
    concepts = [c.strip() for c in p["concepts"] if c.strip()]
    if not concepts:
        raise StudioError("type at least one concept for the guard")
    if not 0 < p["energy"] <= 1 or not 1 <= int(p["max_rank"]) <= 256 or not 0 < p["threshold"] <= 2:
        raise StudioError("guard: energy must be in (0, 1], max_rank in 1..256, threshold in (0, 2]")
    diffs, neutral, words = [], [], []
    for c in concepts:
        templates = templates_for(p["templates"], c)
        e, g = concept_rows(pipe, templates, c, "", "to_end")
        diffs.append(e - g)
        neutral.append(g)
        words.append(concept_rows(pipe, templates, c, "", "word")[0])
    centre = torch.cat(neutral).mean(0)
    directions = torch.stack([d.mean(0) / d.mean(0).norm() for d in diffs])
    thresholds = p["threshold"] * torch.stack([((w - centre) @ u).mean() for w, u in zip(words, directions)])
    _, s, vh = torch.linalg.svd(torch.cat(diffs).double(), full_matrices=False)
    share = (s ** 2).cumsum(0) / (s ** 2).sum()
    k = min(int((share < p["energy"]).sum()) + 1, int(p["max_rank"]))
    return ConceptGuard(directions, thresholds, vh[:k].T.float(), centre)


@edit_kind("erase_guard")
def apply_guard(pipe, params: dict, tensors: dict, patch) -> None:
    known(params, {*DEFAULTS, "concepts"}, "guard")
    guard = build_guard(pipe, {**DEFAULTS, **params})
    steering.install(patch, pipe, "condition", "guard " + ", ".join(params["concepts"]), guard)
