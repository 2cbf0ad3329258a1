"""`python -m studio attention`: a picture's maps as a grid, raw maps and a manifest, e.g. `--words circle --out D`."""
from __future__ import annotations

import argparse

from ..attention.any_image import DEFAULT_TIMESTEP, image_maps
from ..attention.control import Control, default_resolution, default_scale_factor, parse_weights
from ..attention.export import export
from ..attention.maps import BLOCKS, NORMALIZATIONS, Selection, resolve_words
from ..attention.render import COLORMAPS
from ..attention.run import CaptureOptions, generate_with_maps
from ..attention.view import View
from .. import models
from ..errors import StudioError
from ..generation import GenerationRequest
from .common import add_request, words


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_request(p)
    p.add_argument("--words", default="", help="comma-separated words to map (default: every word)")
    p.add_argument("--out", required=True, help="folder for grid.png, maps.npz, manifest.json")
    p.add_argument("--image", help="analyse this image instead of generating one")
    p.add_argument("--timestep", type=int, default=DEFAULT_TIMESTEP, help="with --image: noise level (%(default)s)")
    p.add_argument("--repeats", type=int, default=4, help="with --image: noise draws averaged")
    p.add_argument("--control", default="none", choices=["none", "attend-excite", "a-star"])
    p.add_argument("--subjects", default="", help="subject words for --control (default: --words)")
    p.add_argument("--scale-factor", type=float, help="latent step size (default: 20 published, 2 on small models)")
    p.add_argument("--control-resolution", type=int, help="map resolution the guidance reads")
    p.add_argument("--reweight", default="", help="prompt-to-prompt token weights, e.g. circle=2,red=0.5")
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--resolutions", default="", help="layer resolutions to use, e.g. 16,8 (default: all)")
    p.add_argument("--blocks", default=",".join(BLOCKS), help="down,mid,up")
    p.add_argument("--head", type=int, help="one head instead of the mean (keeps heads)")
    p.add_argument("--steps-range", default="", help="first:last step to average (default: all)")
    p.add_argument("--normalization", default="word", choices=list(NORMALIZATIONS))
    p.add_argument("--cmap", default="jet", choices=list(COLORMAPS))
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--outline", action="store_true", help="outline each map's mask at tau")
    p.add_argument("--special", action="store_true", help="also map SOS and EOS")


def _ints(text: str, what: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(v) for v in text.replace(":", ",").split(",") if v.strip()) or None
    except ValueError:
        raise StudioError(f"{what} takes whole numbers, e.g. 16,8 (got {text!r})") from None


def command(args, manager) -> list:
    heads = args.head is not None
    resolve_words(manager.pipe.tokenizer, args.prompt, args.words)  # a bad word fails before any work
    if args.image:
        result = image_maps(manager, args.image, args.prompt, args.timestep, args.seed, args.negative, args.repeats,
                            heads)
    else:
        scale = args.scale_factor if args.scale_factor is not None else \
            default_scale_factor(models.of(manager.pipe).latent_side)
        resolution = args.control_resolution or default_resolution(models.of(manager.pipe).attention_resolutions())
        control = Control(args.control, words(args.subjects or args.words), scale, resolution=resolution,
                          reweight=parse_weights(args.reweight))
        request = GenerationRequest(args.prompt, args.negative, args.seed, args.steps, args.guidance,
                                    sampler=args.sampler)
        result = generate_with_maps(manager, request, CaptureOptions(per_step=not heads, heads=heads),
                                    control if control.active else None)
    steps = _ints(args.steps_range, "--steps-range")
    if steps is not None and len(steps) != 2:
        raise StudioError("--steps-range takes first:last, e.g. 0:9")
    blocks = tuple(words(args.blocks))
    if unknown := sorted(set(blocks) - set(BLOCKS)):
        raise StudioError(f"unknown block {unknown[0]!r}; blocks are {', '.join(BLOCKS)}")
    selection = Selection(_ints(args.resolutions, "--resolutions"), blocks, args.head, steps)
    view = View(args.words or None, args.special, selection, args.normalization, args.tau, args.outline, args.cmap,
                args.alpha)
    return export(result, view, args.out)
