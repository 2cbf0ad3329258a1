"""`python -m studio` serves the UI; its subcommands (the PLUGINS: one module each) work headless, with no UI."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

from ..customize.compose import region_edit
from ..edit_files import load_edits
from ..errors import StudioError
from ..extract.sam import SamMasks
from ..generation import GenerationRequest
from ..layer_scale import scale_edit
from ..manager import PipelineManager
from .common import add_request

DEFAULT_HISTORY_DIR = Path(os.environ.get("CONCEPT_STUDIO_HOME", Path.home() / ".concept-studio")) / "history"
PLUGINS = {"attention": "cross-attention maps: grid, raw maps, manifest",  # studio/cli/<name>.py
           "erase": "erase concepts; report, save the edit, export a LoRA or the pipeline",
           "customize": "teach a concept from images; try, save and export it",
           "extract": "one token per object of one image (masks found, clicked or given)"}
SUBCOMMANDS = ("generate", "scale", "history", *PLUGINS)


def _model_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="builtin", help="builtin (default), a diffusers folder, .safetensors or hub id")
    g.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.pt/.bin (pickles can run code)")
    g.add_argument("--edits", nargs="*", default=[], help="edit files to apply after loading")
    return p


def _serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m studio", parents=[_model_args()],
                                description="Concept Studio. Subcommands: " + ", ".join(SUBCOMMANDS))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=int, help="port (default: gradio's, 7860 or the next free)")
    p.add_argument("--share", action="store_true", help="create a public gradio share link (off by default)")
    p.add_argument("--auth", help="require a login, as user:password")
    p.add_argument("--max-upload", default="200mb", help="largest file a browser may upload (default 200mb)")
    p.add_argument("--history-dir", default=str(DEFAULT_HISTORY_DIR),
                   help=f"edit history, saved at every change and restored on start (default {DEFAULT_HISTORY_DIR})")
    p.add_argument("--no-history", action="store_true", help="start clean and do not save the edit history")
    p.add_argument("--sam-checkpoint", help="Segment Anything checkpoint: click objects in Extract")
    return p


def _manager(args, history_dir=None):
    m = PipelineManager(args.model, args.device, args.dtype, args.allow_pickle, history_dir=history_dir)
    if history_dir:
        m.pipe
        print(*m.restore_notes, sep="\n", file=sys.stderr)
    for f in args.edits:
        for note in m.load_edits(f):
            print(note, file=sys.stderr)
    return m


def _region(spec: str) -> tuple[str, list[float]]:
    words, _, box = spec.rpartition("=")
    try:
        box = [float(v) for v in box.split(",")]
    except ValueError:
        words = ""
    if not words:
        raise StudioError(f"--region takes WORDS=x0,y0,x1,y1, e.g. '<heart>=0,0,0.5,1' (got {spec!r})")
    return words, box


def _cmd_generate(args) -> None:
    m = _manager(args)
    if args.region:
        print(m.apply(region_edit([_region(s) for s in args.region], collage=args.collage)).edit.title, file=sys.stderr)
    elif args.collage:
        raise StudioError("--collage needs --region boxes: say where each concept goes")
    r = GenerationRequest(args.prompt, args.negative, args.seed, args.steps, args.guidance, args.width, args.height,
                          args.batch, args.sampler)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = zip(("before", "after"), m.compare(r)) if args.compare else [("", m.generate(r))]
    for tag, result in pairs:
        for w in result.warnings:
            print("warning:", w, file=sys.stderr)
        for image, seed in zip(result.images, result.seeds):
            path = out / f"seed{seed}{'-' + tag if tag else ''}.png"
            image.save(path)
            print(path)


def _cmd_scale(args) -> None:
    m = _manager(args)
    entry = m.apply(scale_edit(args.pattern, args.factor))
    print(f"{entry.edit.title}: {len(entry.patch.originals)} tensors; fingerprint {m.fingerprint()[:12]}")
    print(m.save_edits(args.save))


def _cmd_history(args) -> None:
    for i, s in enumerate(load_edits(args.file), 1):
        print(f"{i}. {s.edit.title}  kind={s.edit.kind}  params={json.dumps(s.edit.params)}  "
              f"tensors touched={len(s.original_digests)}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in SUBCOMMANDS:
            p = argparse.ArgumentParser(prog="python -m studio")
            sub = p.add_subparsers(dest="command", required=True)
            g = sub.add_parser("generate", parents=[_model_args()], help="generate images to a folder")
            add_request(g)
            g.add_argument("--width", type=int)
            g.add_argument("--height", type=int)
            g.add_argument("--batch", type=int, default=1)
            g.add_argument("--out", default="outputs", help="folder for the PNGs")
            g.add_argument("--compare", action="store_true", help="also render without the last edit (before/after)")
            g.add_argument("--region", action="append", default=[], metavar="WORDS=X0,Y0,X1,Y1",
                           help="the prompt's WORDS go in this box (fractions of the image); one per concept")
            g.add_argument("--collage", type=float, default=0.0, metavar="SHARE", help="with --region: draw "
                           "regions alone, paste, redraw this share of the steps whole (0: masking only; 0.2 toy)")
            s = sub.add_parser("scale", parents=[_model_args()], help="scale matching weights, save as an edit file")
            s.add_argument("--pattern", required=True, help="regular expression on parameter names")
            s.add_argument("--factor", type=float, required=True)
            s.add_argument("--save", required=True, help="edit file to write (.safetensors)")
            sub.add_parser("history", help="list the edits in an edit file").add_argument("file")
            plugins = {name: importlib.import_module(f"{__name__}.{name}") for name in PLUGINS}
            for name, module in plugins.items():
                module.add_arguments(sub.add_parser(name, parents=[_model_args()], help=PLUGINS[name]))
            args = p.parse_args(argv)
            if args.command in plugins:
                print(*plugins[args.command].command(args, _manager(args)), sep="\n")
            else:
                {"generate": _cmd_generate, "scale": _cmd_scale, "history": _cmd_history}[args.command](args)
            return 0
        args = _serve_parser().parse_args(argv)
        user, _, password = (args.auth or "").partition(":")
        if args.auth and not (user and password):
            raise StudioError("--auth takes user:password")
        auth = (user, password) if args.auth else None
        sam = SamMasks.load(args.sam_checkpoint) if args.sam_checkpoint else None
        manager = _manager(args, None if args.no_history else args.history_dir)
        importlib.import_module("components.app").launch(manager, args.host, args.port, args.share, auth, sam=sam,
                                                         max_upload=args.max_upload)
        return 0
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
