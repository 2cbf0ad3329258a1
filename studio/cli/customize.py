"""`python -m studio customize`, e.g. `customize photos/*.png --token "<my-cat>" --class-word cat --export out/`."""
from __future__ import annotations

import argparse

from PIL import Image

from .. import models
from ..customize.formats import export_concept, import_concept
from ..customize.images import load_images
from ..customize.train import LORA_TARGETS, METHODS, train_concept
from ..errors import StudioError
from ..toyworld.presets import toy_examples, toy_prior_prompts
from .common import add_outputs, progress, write_outputs

TRAIN_FLAGS = ("method", "class_word", "steps", "lr", "token_lr", "batch", "vectors", "semantic_weight", "prior_weight",
               "prior_prompts", "prior_images", "gradient_checkpointing", "save_dir", "save_every", "resume", "scope")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="3-10 images of the concept (same-name .txt files are captions)")
    p.add_argument("--toy-example", choices=["heart", "cross"], help="toy model: 8 images of a held-out shape")
    p.add_argument("--token", help="the new token, e.g. <my-cat> (for --import: rename the embedding)")
    p.add_argument("--import", dest="import_files", nargs="+", metavar="FILE", help="apply exported files instead")
    p.add_argument("--class-word", default="", help="what the concept is (cross-init, preservation losses)")
    p.add_argument("--method", choices=list(METHODS), default="lora")
    p.add_argument("--steps", type=int, help="default: the method's default for this model size")
    p.add_argument("--lr", type=float)
    p.add_argument("--token-lr", type=float)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, help="default 4 (16 with --toy-example)")
    p.add_argument("--lora-targets", choices=list(LORA_TARGETS), help="default attention (+ff with --toy-example)")
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--no-cross-init", action="store_true")
    p.add_argument("--semantic-weight", type=float, default=0.0, help="ClassDiffusion semantic preservation")
    p.add_argument("--prior-weight", type=float, default=0.0, help="prior preservation on images the model draws now")
    p.add_argument("--prior-prompt", dest="prior_prompts", action="append", default=[],
                   help="what the model must keep drawing (repeatable; default 'a <class word>', or the toy shapes)")
    p.add_argument("--prior-images", type=int, default=48)
    p.add_argument("--cut-mix", type=float, help="share of concept+prior image pairs (default 0, toy example 0.5)")
    p.add_argument("--scope", choices=["prompt", "always"], default="prompt", help="prompts with the token, or all")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-dir", help="save the training state here every --save-every steps (for --resume)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the state in --save-dir")
    add_outputs(p, "concept")
    p.add_argument("--export", help="folder: embedding (A1111/ComfyUI), kohya LoRA, Custom Diffusion deltas")


def command(args, manager) -> list[str]:
    if args.import_files:
        edit = import_concept(args.import_files, token=args.token, pipe=manager, scope=args.scope)
        manager.apply(edit)
        return [f"{edit.title}: applied"] + _after(args, manager, edit)
    if not args.token:
        raise StudioError("--token is required to train a concept (e.g. --token '<my-cat>')")
    sources, captions = list(args.images), None
    if args.toy_example:
        examples = toy_examples(args.toy_example)
        sources, captions = [Image.fromarray(im) for im, _ in examples], [c for _, c in examples]
        args.prior_prompts = args.prior_prompts or toy_prior_prompts()
        args.cut_mix = 0.5 if args.cut_mix is None else args.cut_mix
        args.rank, args.lora_targets = args.rank or 16, args.lora_targets or "attention+ff"  # the measured setting
    images, notes = load_images(sources, models.of(manager.pipe).default_size, captions)
    edit = train_concept(manager, images, args.token, **{k: getattr(args, k) for k in TRAIN_FLAGS},
                         rank=args.rank or 4, lora_targets=args.lora_targets or "attention", progress=progress,
                         cut_mix=args.cut_mix or 0.0, cross_init=not args.no_cross_init)
    print()
    manager.apply(edit)
    p = edit.params
    lines = notes + [f"{edit.title}: {p['steps']} steps, {p['train_seconds']:.1f} s, final loss {p['final_loss']:.4f}"]
    return lines + _after(args, manager, edit)


def _after(args, manager, edit) -> list[str]:
    lines = write_outputs(args, manager, "concept")
    if args.export:
        result = export_concept(edit, args.export, model=manager)
        lines += [f"exported {fmt}: {', '.join(paths)}" for fmt, paths in result["written"].items()]
        lines += result["notes"] + [f"not exported ({fmt}): {why}" for fmt, why in result["errors"].items()]
    return lines
