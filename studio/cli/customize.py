"""`python -m studio customize`: teach a concept from images headless, try it, save or export it.

    python -m studio customize photos/*.png --token "<my-cat>" --class-word cat --method lora \\
        --steps 500 --prompt "a photo of <my-cat> on a beach" --save cat.safetensors --export exported/
    python -m studio customize --toy-example heart --token "<heart>" --prompt "a red <heart>"   # toy model
"""
from __future__ import annotations

import argparse
from .. import models
from ..errors import StudioError
from ..customize.images import load_images
from ..customize.train import LORA_TARGETS, METHODS, train_concept
from .common import add_outputs, progress, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="*", help="3-10 images of the concept (same-name .txt files are captions)")
    p.add_argument("--toy-example", choices=["heart", "cross"], help="toy model: 8 generator images of a held-out shape")
    p.add_argument("--token", default=None, help="the new token, e.g. <my-cat> (for --import: rename the embedding)")
    p.add_argument("--import", dest="import_files", nargs="+", metavar="FILE",
                   help="instead of training: apply an embedding / kohya LoRA / Custom Diffusion export")
    p.add_argument("--class-word", default="", help="what the concept is (cross-init, preservation losses)")
    p.add_argument("--method", choices=list(METHODS), default="lora")
    p.add_argument("--steps", type=int, default=None, help="default: the method's default for this model size")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--token-lr", type=float, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rank", type=int, default=None, help="default: 16 with --toy-example, else 4")
    p.add_argument("--lora-targets", choices=list(LORA_TARGETS), default=None,
                   help="default: attention+ff with --toy-example, else attention")
    p.add_argument("--vectors", type=int, default=1)
    p.add_argument("--no-cross-init", action="store_true")
    p.add_argument("--semantic-weight", type=float, default=0.0, help="ClassDiffusion semantic preservation")
    p.add_argument("--prior-weight", type=float, default=None,
                   help="prior preservation on images the model draws now (default 0)")
    p.add_argument("--prior-prompt", action="append", default=[],
                   help="what the model must keep drawing (repeatable; default 'a <class word>', or the toy shapes)")
    p.add_argument("--prior-images", type=int, default=48)
    p.add_argument("--cut-mix", type=float, default=None,
                   help="share of training pictures pairing a concept image with a prior image side by side, so the "
                        "concept composes with others (default: 0.5 with --toy-example, else 0; needs prior prompts)")
    p.add_argument("--scope", choices=["prompt", "always"], default="prompt",
                   help="where the concept's weight changes act: prompts that use its token (default), or every "
                        "prompt (merged into the weights)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--save-dir", help="save the training state here every --save-every steps (for --resume)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the state in --save-dir")
    add_outputs(p, "concept")
    p.add_argument("--export", help="folder: embedding (A1111/ComfyUI), kohya LoRA, Custom Diffusion deltas")


def command(args, manager) -> list[str]:
    pipe = manager.pipe
    if args.import_files:
        from ..customize.formats import import_concept

        edit = import_concept(args.import_files, token=args.token, pipe=manager, scope=args.scope)
        manager.apply(edit)
        return [f"{edit.title}: applied"] + _after(args, manager, edit)
    if not args.token:
        raise StudioError("--token is required to train a concept (e.g. --token '<my-cat>')")
    resolution = models.of(pipe).default_size
    sources, captions = list(args.images), None
    if args.toy_example:
        from PIL import Image

        from ..toyworld.presets import toy_examples, toy_prior_prompts

        examples = toy_examples(args.toy_example)
        sources, captions = [Image.fromarray(im) for im, _ in examples], [c for _, c in examples]
        args.prior_prompt = args.prior_prompt or toy_prior_prompts()
        args.prior_weight = 0.0 if args.prior_weight is None else args.prior_weight
        args.cut_mix = 0.5 if args.cut_mix is None else args.cut_mix
        args.rank, args.lora_targets = args.rank or 16, args.lora_targets or "attention+ff"  # the measured setting
    images, notes = load_images(sources, resolution, captions)
    edit = train_concept(manager, images, args.token, method=args.method, class_word=args.class_word,
                         steps=args.steps, lr=args.lr, token_lr=args.token_lr, batch=args.batch, rank=args.rank or 4,
                         lora_targets=args.lora_targets or "attention", vectors=args.vectors, cross_init=not args.no_cross_init,
                         semantic_weight=args.semantic_weight, prior_weight=args.prior_weight or 0.0,
                         prior_prompts=args.prior_prompt, prior_images=args.prior_images,
                         gradient_checkpointing=args.gradient_checkpointing, save_dir=args.save_dir,
                         save_every=args.save_every, resume=args.resume, scope=args.scope, cut_mix=args.cut_mix or 0.0,
                         progress=progress)
    print()
    manager.apply(edit)
    p = edit.params
    lines = notes + [f"{edit.title}: {p['steps']} steps, {p['train_seconds']:.1f} s, final loss {p['final_loss']:.4f}"]
    return lines + _after(args, manager, edit)


def _after(args, manager, edit) -> list[str]:
    """Generate the --prompt images, save the edit file, export."""
    lines = write_outputs(args, manager, "concept")
    if args.export:
        from ..customize.formats import export_concept

        result = export_concept(edit, args.export, model=manager)
        lines += [f"exported {fmt}: {', '.join(paths)}" for fmt, paths in result["written"].items()]
        lines += result["notes"] + [f"not exported ({fmt}): {why}" for fmt, why in result["errors"].items()]
    return lines
