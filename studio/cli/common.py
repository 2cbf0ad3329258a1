"""What subcommands share: comma lists, the generation flags, a step counter, the outputs after an edit."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..generation import SAMPLERS, GenerationRequest


def words(text: str, sep: str = ",") -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [w.strip() for w in text.split(sep) if w.strip()]


def progress(i: int, n: int) -> None:
    print(f"\rstep {i}/{n}", end="", flush=True)


def add_request(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative", default="")
    p.add_argument("--seed", default="0")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--sampler", default="DPM++ 2M", choices=list(SAMPLERS))


def add_outputs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--prompt", action="append", default=[], help="generate this prompt afterwards (repeatable)")
    p.add_argument("--out", default="outputs", help="folder for the generated PNGs")
    p.add_argument("--save", help=f"write the {what} as an edit file (.safetensors)")


def write_outputs(args, manager, prefix: str) -> list[str]:
    lines, out = [], Path(args.out)
    for i, prompt in enumerate(args.prompt):
        out.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(manager.generate(GenerationRequest(prompt, seed=0, batch=4)).images):
            image.save(out / f"{prefix}-{i}-{j}.png")
        lines.append(f"{prompt!r}: 4 images in {out}")
    if args.save:
        lines.append(f"edit file: {manager.save_edits(args.save)}")
    return lines
