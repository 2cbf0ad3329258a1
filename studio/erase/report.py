"""How well an erasure worked: before/after images on fixed seeds and, on the toy world, measured scores.

Efficacy: the concept's presence on prompts that ask for it; generality: under synonyms and paraphrases;
specificity: neighbours still appear; robustness: presence under RECE's attack embedding. Before is the
model one edit earlier.
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
        """Mean presence per group, before and after."""
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
        """A matplotlib bar chart of presence before vs after, one pair of bars per group."""
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
    """Score history entry `index` (1-based, default: the latest applied) against the model before it.

    `probes` and `presence(image, concept) -> 0..1`, the instrument that scores them, come from the caller
    (the toy world's presets); without them the report is a before/after grid of generic prompts."""
    report = ErasureReport()
    with manager.lock:
        stack = manager.stack
        index = stack.position if index is None else int(index)
        if not 1 <= index <= stack.position:
            raise StudioError("there is no applied edit to report on: erase something first")
        entry = stack.entries[index - 1]
        measured = probes is not None and presence is not None
        if not measured:
            report.notes.append("No oracle for this model/concept: showing the before/after grid only "
                                "(no CLIP model is available locally to score it).")
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
    if any(p.attack for p in items) and not any(("after", i) in results for i, p in enumerate(items) if p.attack):
        report.notes.append("robustness: this edit changed no cross-attention K/V weights, so there is no "
                            "closed-form attack embedding (an inference-time guard is bypassed by editing the code).")
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
