"""`python -m studio erase`, e.g. `erase "Van Gogh" --guide art --templates style --export-lora vg.safetensors`."""
from __future__ import annotations

import argparse

from ..erase import esd
from ..erase.closed_form import DEFAULTS, erase_edit
from ..erase.guard import guard_edit
from ..lora_export import export_lora, export_pipeline
from ..toyworld.presets import erasure_report, is_toy, toy_captions
from .common import add_outputs, progress, words, write_outputs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("concepts", type=words, help="concepts to erase, comma-separated")
    p.add_argument("--method", choices=["uce", "guard", "esd"], default="uce", help="closed form, guard, LoRA (ESD)")
    p.add_argument("--guide", default="", help="what the concept should become (default: empty prompt)")
    p.add_argument("--preserve", type=words, default=[], help="concepts to keep, comma-separated")
    p.add_argument("--templates", default="object", help="object, style, toy, none, or templates joined by '|'")
    p.add_argument("--tokens", choices=["to_end", "word"], default=DEFAULTS["tokens"])
    for key in ("lam", "erase_scale", "preserve_scale", "rece_lambda"):
        p.add_argument("--" + key.replace("_", "-"), type=float, default=DEFAULTS[key])
    p.add_argument("--rece", type=int, default=0, help="RECE hardening rounds (1-3)")
    p.add_argument("--neighbours", type=int, default=0, help="RealEra neighbour samples per vector")
    p.add_argument("--esd-method", choices=list(esd.METHODS), default="esd-x")
    p.add_argument("--rank", type=int, default=2, help="LoRA rank of the fine-tuned adapter")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, help="default: chosen from the model's size")
    p.add_argument("--captions", type=lambda t: words(t, "|"), help="ESD captions with the concept, joined by '|'")
    p.add_argument("--report", action="store_true", help="print the before/after table (toy world: measured)")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt in the report")
    add_outputs(p, "erasure")
    p.add_argument("--export-lora", help="write the weight change as a kohya-style LoRA (.safetensors)")
    p.add_argument("--export-rank", type=int, default=4)
    p.add_argument("--export-pipeline", help="save the whole edited pipeline to this folder")


def command(args, manager) -> list[str]:
    templates = args.templates.split("|") if "{}" in args.templates else args.templates
    if args.method == "uce":
        edit = erase_edit(args.concepts, guide=args.guide, preserve=args.preserve, templates=templates,
                          tokens=args.tokens, lam=args.lam, erase_scale=args.erase_scale,
                          preserve_scale=args.preserve_scale, rece_rounds=args.rece, rece_lambda=args.rece_lambda,
                          neighbours=args.neighbours)
    elif args.method == "guard":
        edit = guard_edit(args.concepts, templates=templates)
    else:
        captions = toy_captions(args.concepts[0]) if args.captions is None and is_toy(manager) else args.captions
        edit = esd.train_esd(manager, args.concepts[0], method=args.esd_method, rank=args.rank, steps=args.steps,
                             lr=args.lr, concept_prompts=captions, progress=progress)
    entry = manager.apply(edit)
    lines = [f"{entry.edit.title}: {len(entry.patch.originals)} tensors; fingerprint {manager.fingerprint()[:12]}"]
    if args.report:
        lines.append(erasure_report(manager, args.concepts, args.preserve, seeds=args.seeds).table())
    lines += write_outputs(args, manager, "erase")
    if args.export_lora:
        rep = export_lora(manager, args.export_lora, rank=args.export_rank)
        lines.append(f"LoRA: {rep['path']} (rank {rep['rank']}, relative error {rep['error']:.2e})")
    if args.export_pipeline:
        lines.append(f"pipeline: {export_pipeline(manager, args.export_pipeline)}")
    return lines
