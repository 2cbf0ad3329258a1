"""How well an erasure worked: before/after images on fixed seeds (before: the model one edit earlier) and,
on the toy world, the concept's measured presence under efficacy, generality, specificity and attack probes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import StudioError
from ..generation import GenerationRequest
from .closed_form import LAYER_SUFFIXES
from .text import encode


@dataclass
class Probe:
    group: str
    prompt: str
    concept: str  # canonical word the oracle looks for
    attack: bool = False


@dataclass
class ErasureReport:
    rows: list[dict] = field(default_factory=list)  # group, prompt, concept, before, after
    grid: list[tuple] = field(default_factory=list)  # (image, caption), before/after pairs on seed 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[dict]:
        groups: dict[str, list[dict]] = {}
        for r in self.rows:
            groups.setdefault(r["group"], []).append(r)
        return [dict(group=g, prompts=len(rs), before=sum(r["before"] for r in rs) / len(rs),
                     after=sum(r["after"] for r in rs) / len(rs)) for g, rs in groups.items()]

    def table(self) -> str:
        lines = [f"{'group':<34}{'prompts':>8}{'before':>9}{'after':>9}"]
        lines += [f"{s['group']:<34}{s['prompts']:>8}{s['before']:>9.0%}{s['after']:>9.0%}" for s in self.summary()]
        return "\n".join(lines + self.notes)

    def chart(self):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        s = self.summary()
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = torch.arange(len(s)).numpy()
        ax.bar(x - 0.2, [r["before"] for r in s], 0.4, label="before", color="#8aa1b1")
        ax.bar(x + 0.2, [r["after"] for r in s], 0.4, label="after", color="#d1495b")
        ax.set_xticks(x, [r["group"] for r in s], rotation=15, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("oracle: concept present")
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig


def attack_embedding(manager, prompt: str, entry, lam: float = 1e-3) -> torch.Tensor | None:
    """RECE's attack: c' = (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀW c over the K/V layers `entry` changed (None if none)."""
    names = [n for n in entry.patch.originals if n.endswith(LAYER_SUFFIXES["kv"]) and ".attn2." in n]
    if not names:
        return None
    pipe = manager.pipe
    c = encode(pipe, [prompt])[0].double()
    live = {n: entry.patch.read(n).detach().double().cpu() for n in names}
    gram_new = sum(live[n].T @ live[n] for n in names)
    cross = sum(live[n].T @ entry.patch.originals[n].double() for n in names)
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    attacked = c.cpu() @ torch.linalg.solve(gram_new + lam * eye, cross).T
    return attacked.unsqueeze(0).to(pipe.device, pipe.text_encoder.dtype)


def erasure_report(manager, erased: list[str], index: int | None = None, seeds: int = 4, steps: int = 20,
                   progress=None, *, probes: list[Probe] | None = None, presence=None) -> ErasureReport:
    """Score history entry `index` (1-based, default: the latest applied) against the model before it, on the
    caller's `probes` scored by `presence(image, concept) -> 0..1`; without them, a grid of generic prompts."""
    report = ErasureReport()
    with manager.lock:
        stack = manager.stack
        index = stack.position if index is None else int(index)
        if not 1 <= index <= stack.position:
            raise StudioError("there is no applied edit to report on: erase something first")
        entry = stack.entries[index - 1]
        measured = probes is not None and presence is not None
        if not measured:
            report.notes.append("No oracle for this model/concept: the before/after grid only (no local CLIP scores).")
        items = probes if measured else [Probe(p, p, "") for w in erased for p in (f"a photo of {w}", w, f"art by {w}")]
        here = stack.position
        try:
            results = {}
            for phase, position in (("before", index - 1), ("after", index)):
                stack.goto(position)
                for i, probe in enumerate(items):
                    attacked = probe.attack and phase == "after"
                    embeds = attack_embedding(manager, probe.prompt, entry) if attacked else None
                    if attacked and embeds is None:
                        continue
                    r = manager.generate(GenerationRequest(probe.prompt, seed=0, batch=seeds, steps=steps),
                                         prompt_embeds=embeds)
                    results[phase, i] = r.images
                    if progress:
                        progress(len(results), 2 * len(items))
        finally:
            stack.goto(here)
    if any(p.attack and ("after", i) not in results for i, p in enumerate(items)):
        report.notes.append("robustness: this edit changed no cross-attention K/V weights: no closed-form attack "
                            "embedding (an inference-time guard is bypassed by editing the code).")
    shown = set()
    for i, probe in enumerate(items):
        if ("after", i) not in results:
            continue
        before = results["before", i]
        if probe.group not in shown:
            shown.add(probe.group)
            report.grid += [(before[0], f"before · {probe.prompt}"),
                            (results["after", i][0], f"after · {probe.prompt}" + (" (attack)" if probe.attack else ""))]
        if measured:
            rate = lambda ims: sum(presence(im, probe.concept) for im in ims) / len(ims)  # noqa: E731
            report.rows.append(dict(group=probe.group, prompt=probe.prompt, concept=probe.concept,
                                    before=rate(before), after=rate(results["after", i])))
    return report
