"""What every subcommand shares: comma lists, a step counter on the terminal, and the outputs after a
concept is learned (images of --prompt, the edit file)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..generation import GenerationRequest


def words(text: str) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [w.strip() for w in text.split(",") if w.strip()]


def progress(i: int, n: int) -> None:
    print(f"\rstep {i}/{n}", end="", flush=True)


def add_outputs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--prompt", action="append", default=[], help="generate this prompt afterwards (repeatable)")
    p.add_argument("--out", default="outputs", help="folder for the generated PNGs")
    p.add_argument("--save", help=f"write the {what} as an edit file (.safetensors)")


def write_outputs(args, manager, prefix: str) -> list[str]:
    """Four images of each --prompt into --out, then the edit file if --save."""
    lines, out = [], Path(args.out)
    for i, prompt in enumerate(args.prompt):
        out.mkdir(parents=True, exist_ok=True)
        for j, image in enumerate(manager.generate(GenerationRequest(prompt, seed=0, batch=4)).images):
            image.save(out / f"{prefix}-{i}-{j}.png")
        lines.append(f"{prompt!r}: 4 images in {out}")
    if args.save:
        lines.append(f"edit file: {manager.save_edits(args.save)}")
    return lines
