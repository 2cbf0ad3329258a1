"""`python -m studio extract`: one token per mask, e.g. `extract photo.png --find --tokens "<a>,<b>"`."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from .. import models
from ..errors import StudioError
from ..extract.break_a_scene import extract_concepts
from ..extract.evaluate import evaluate_extraction, table
from ..extract.localize import check_masks, find_concepts, prepare_image
from ..extract.sam import SamMasks
from ..images import fit_mask, load_rgb, open_image, to_tensor
from ..toyworld.evaluate import bundled_oracle
from ..toyworld.scenes import make_scene
from ..training import TrainingImage
from .common import add_outputs, progress, words, write_outputs


def _click(text: str) -> tuple[int, float, float]:
    """'x,y' (mask 1) or 'x,y:k' (mask k) as (k - 1, x, y)."""
    point, _, k = text.partition(":")
    try:
        x, y = (float(v) for v in point.split(","))
        return int(k or 1) - 1, x, y
    except ValueError:
        raise argparse.ArgumentTypeError(f"a click is x,y or x,y:mask (got {text!r})") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", nargs="?", help="the image with several things in it")
    p.add_argument("--toy-scene", type=int, help="toy model: the generator's two-object scene with this seed")
    p.add_argument("--tokens", type=words, required=True, help="one token per mask, comma-separated, e.g. '<a>,<b>'")
    p.add_argument("--mask", action="append", default=[], help="a mask image (white = object), once per concept")
    p.add_argument("--find", action="store_true", help="find the masks from the model's self-attention")
    p.add_argument("--count", type=int, help="with --find: how many concepts (default: automatic)")
    p.add_argument("--sam-checkpoint", help="Segment Anything checkpoint for --click")
    p.add_argument("--click", type=_click, action="append", default=[], help="x,y[:mask] in image pixels (SAM)")
    p.add_argument("--steps-tokens", type=int)
    p.add_argument("--steps-joint", type=int)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--report", action="store_true", help="toy model: oracle-measured identity and ACC@1")
    add_outputs(p, "extracted concepts")
    p.add_argument("--save-masks", help="folder to write the masks used (PNG)")


def command(args, manager) -> list[str]:
    size = models.of(manager.pipe).default_size
    if args.toy_scene is None and not args.image:
        raise StudioError("give an image (or --toy-scene N on the toy model)")
    source = args.image if args.toy_scene is None else make_scene(args.toy_scene, n_objects=2, held_out=True).image
    picture, lines = prepare_image(source, size)
    if args.find:
        masks = find_concepts(manager, picture, count=args.count)
    elif args.click:
        sam = SamMasks.load(args.sam_checkpoint)
        original = load_rgb(source)[0]  # clicks are in the original image's pixels
        shown = original.info.get("original_size")
        groups = [[(x, y) for j, x, y in args.click if j == k] for k in sorted({c[0] for c in args.click})]
        masks = [fit_mask(sam.masks_from_clicks(original, p, [1] * len(p), display_size=shown), size) for p in groups]
    else:
        masks = [fit_mask(open_image(m).convert("L"), size) for m in args.mask]
    lines += check_masks(masks, picture.shape[:2])
    if args.save_masks:
        Path(args.save_masks).mkdir(parents=True, exist_ok=True)
        for i, m in enumerate(masks):
            Image.fromarray(m.astype(np.uint8) * 255).save(Path(args.save_masks) / f"mask-{i + 1}.png")
    edit = extract_concepts(manager, TrainingImage(to_tensor(picture)), masks, args.tokens,
                            steps_tokens=args.steps_tokens, steps_joint=args.steps_joint, rank=args.rank,
                            progress=progress)
    print()
    manager.apply(edit)
    lines.append(f"{edit.title}: {edit.params['steps']} steps, {edit.params['train_seconds']:.1f} s")
    if args.report:
        oracle = bundled_oracle()
        readings = oracle.read(picture)
        concepts = [(r.shape, r.colour) for r in
                    (max(readings, key=lambda r: (r.mask & m).sum()) for m in masks)] if readings else []
        if len(concepts) == len(args.tokens):
            rows = table(evaluate_extraction(manager, args.tokens, concepts, oracle))
            lines += ["token | object | shape | colour | ACC@1"] + [" | ".join(map(str, r)) for r in rows]
        else:
            lines.append("report: the oracle could not read the objects under the masks")
    return lines + write_outputs(args, manager, "extract")
