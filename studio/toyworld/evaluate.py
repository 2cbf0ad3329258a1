"""Oracle-scored evaluation on fixed prompts and seeds, the harness every tab's report reuses.

    python -m studio.toyworld.evaluate [--model builtin] [--seeds 4] [--steps 20] [--out bench/results/toy-eval.json]
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from ..attention.maps import iou
from ..capture import capture
from ..generation import GenerationRequest
from ..loading import ASSETS
from ..tokenizer import token_positions
from .oracle import Oracle
from .scenes import COLOURS, SHAPES, STYLES, SYNONYMS, with_article

SEEDS = 8  # images per prompt: seeds 0..SEEDS-1, generated as one batch


@dataclass(frozen=True)
class Wanted:
    shape: str
    colour: str
    style: str | None = None  # None: not asked for (solid expected only when asked)


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    objects: tuple[Wanted, ...]
    group: str = "single"


@lru_cache(maxsize=1)
def bundled_oracle() -> Oracle:
    return Oracle.load(ASSETS / "toy-oracle.safetensors")


def single_prompts() -> list[PromptSpec]:
    return [PromptSpec(with_article(f"{c} {s}"), (Wanted(s, c),)) for s in SHAPES for c in COLOURS]


def style_prompts() -> list[PromptSpec]:
    colours = list(COLOURS)
    return [PromptSpec(with_article(f"{st} {colours[(i + j) % 6]} {s}"), (Wanted(s, colours[(i + j) % 6], st),), "style")
            for i, s in enumerate(SHAPES) for j, st in enumerate(STYLES)]


def synonym_prompts() -> list[PromptSpec]:
    """Every synonym with several partners, held-out combinations included."""
    specs = []
    for word, syns in SYNONYMS.items():
        for syn in syns:
            if word in COLOURS:
                specs += [PromptSpec(with_article(f"{syn} {s}"), (Wanted(s, word),), "synonym") for s in SHAPES]
            elif word in SHAPES:
                specs += [PromptSpec(with_article(f"{c} {syn}"), (Wanted(word, c),), "synonym") for c in COLOURS]
            else:
                specs += [PromptSpec(with_article(f"{syn} {c} {s}"), (Wanted(s, c, word),), "synonym")
                          for s, c in zip(SHAPES, COLOURS)]
    return specs


def two_object_prompts() -> list[PromptSpec]:
    colours, specs = list(COLOURS), []
    for i, (a, b) in enumerate([(a, b) for a in SHAPES for b in SHAPES if a != b]):
        ca, cb = colours[i % 6], colours[(i + 3) % 6]
        specs.append(PromptSpec(f"{with_article(f'{ca} {a}')} and {with_article(f'{cb} {b}')}",
                                (Wanted(a, ca), Wanted(b, cb)), "two"))
    return specs


def default_prompt_set() -> list[PromptSpec]:
    return single_prompts() + style_prompts() + synonym_prompts() + two_object_prompts()


@dataclass
class Score:
    group: str
    rows: list = field(default_factory=list)  # per image: prompt, seed and the judge's verdicts
    styled: list = field(default_factory=list)  # style verdicts where the prompt asks for a style

    def rates(self) -> dict[str, float]:
        share = lambda k: sum(row[k] for row in self.rows) / max(len(self.rows), 1)  # noqa: E731
        r = {"images": len(self.rows), "colour": share("colour"), "shape": share("shape"),
             "all objects right": share("both")}
        if self.styled:
            r["style"] = sum(self.styled) / len(self.styled)
        return r


def judge(readings, wanted: tuple[Wanted, ...]) -> dict[str, bool]:
    """Per image: is every wanted object there (colour and shape on one object), and per attribute."""
    def has(**kw):
        return any(all(getattr(r, k) == v for k, v in kw.items()) for r in readings)
    return dict(
        colour=all(has(colour=w.colour) for w in wanted),
        shape=all(has(shape=w.shape) for w in wanted),
        style=all(has(shape=w.shape, style=w.style) or has(colour=w.colour, style=w.style) for w in wanted if w.style),
        both=all(has(shape=w.shape, colour=w.colour) for w in wanted),
    )


def score(manager, specs: list[PromptSpec], seeds: int = SEEDS, steps: int = 20, progress=None) -> dict[str, Score]:
    """Every prompt on every seed, judged by the oracle, by spec.group."""
    groups: dict[str, Score] = {}
    for i, spec in enumerate(specs):
        g = groups.setdefault(spec.group, Score(spec.group))
        result = manager.generate(GenerationRequest(spec.prompt, seed=0, batch=seeds, steps=steps))
        for seed, image in zip(result.seeds, result.images):
            verdict = judge(bundled_oracle().read(image), spec.objects)
            g.rows.append(dict(prompt=spec.prompt, seed=seed, **verdict))
            if any(w.style for w in spec.objects):
                g.styled.append(verdict["style"])
        if progress:
            progress(i + 1, len(specs))
    return groups


def presence_rate(manager, prompts: list[str], concept: str, seeds: int = SEEDS, steps: int = 20) -> float:
    """Share of images (prompts x seeds) in which the oracle sees `concept` (a colour, shape or style)."""
    hits = [bundled_oracle().presence(image, concept) for p in prompts
            for image in manager.generate(GenerationRequest(p, seed=0, batch=seeds, steps=steps)).images]
    return sum(hits) / len(hits)


def attention_iou(manager, specs: list[PromptSpec], seeds: int = SEEDS, steps: int = 20, top: float = 0.25) -> dict:
    """IoU of the top `top` share of a shape word's cross-attention map with the oracle's mask of that object
    (where the oracle sees the shape), and the expected IoU of a random pixel set of that size."""
    ious, chances = [], []
    for spec in specs:
        want = spec.objects[0]
        with capture(manager) as session:
            result = manager.generate(GenerationRequest(spec.prompt, seed=0, batch=seeds, steps=steps))
        maps = session.cross.maps(size=64)[:, token_positions(manager.pipe.tokenizer, spec.prompt, want.shape)].mean(1)
        for image, m in zip(result.images, maps):
            found = [r for r in bundled_oracle().read(image) if r.shape == want.shape]
            if not found:
                continue
            mask = torch.as_tensor(found[0].mask)
            ious.append(iou(m >= m.flatten().quantile(1 - top), mask))
            a, k = float(mask.sum()), top * mask.numel()
            chances.append(top * a / (a + k - top * a))
    n = max(len(ious), 1)
    return {"images": len(ious), "iou": sum(ious) / n, "chance": sum(chances) / n}


def table(groups: dict[str, Score]) -> str:
    cols = ["images", "colour", "shape", "style", "all objects right"]
    lines = [f"{'group':<10}" + "".join(f"{c:>19}" for c in cols)]
    for name, g in groups.items():
        r = g.rates()
        lines.append(f"{name:<10}" + "".join(f"{r[c]:>19.0%}" if c in r and c != "images" else
                                              f"{r.get(c, '-')!s:>19}" for c in cols))
    return "\n".join(lines)


def main() -> None:
    from ..manager import PipelineManager

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--seeds", type=int, default=SEEDS, help="images per prompt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="bench/results/toy-eval.json")
    args = ap.parse_args()
    manager = PipelineManager(args.model)
    groups = score(manager, default_prompt_set(), seeds=args.seeds, steps=args.steps,
                   progress=lambda i, n: print(f"\r{i}/{n} prompts", end="", flush=True))
    iou = attention_iou(manager, single_prompts(), seeds=args.seeds, steps=args.steps)
    print("\n" + manager.describe())
    print(table(groups))
    print(f"cross-attention of the shape word, top 25% of pixels vs the object's mask: IoU {iou['iou']:.3f} "
          f"(chance {iou['chance']:.3f}, {iou['images']} images)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": manager.describe(), "attention_iou": iou,
                               **{k: dict(rates=g.rates(), rows=g.rows) for k, g in groups.items()}}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
