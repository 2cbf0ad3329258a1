"""Where a model comes from: the built-in model, a diffusers folder, a hub id, or a single file.
Pickle checkpoints can run arbitrary code when loaded: refused without --allow-pickle."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from . import models
from .errors import StudioError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TOY_MODEL = ASSETS / "toy-model"
BUILTIN = "builtin"
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelInfo:
    source: str
    kind: str  # builtin-toy | builtin-demo | folder | hub | single-file
    device: str
    dtype: str

    @property
    def is_demo(self) -> bool:
        return self.kind == "builtin-demo"

    def describe(self) -> str:
        what = {"builtin-toy": "bundled toy-world model", "builtin-demo": "demo model (random weights: it knows nothing yet)"}
        return f"{what.get(self.kind, self.source)} · {self.device} · {self.dtype}"


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise StudioError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudioError("--device cuda was asked for but no CUDA GPU is visible to PyTorch")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise StudioError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
    return table[dtype]


def classify_source(source: str, allow_pickle: bool = False) -> str:
    """Decide how to load `source`, refusing what cannot or must not be loaded, before any I/O."""
    if source in ("", BUILTIN):
        return "builtin-toy" if (TOY_MODEL / "model_index.json").is_file() else "builtin-demo"
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise StudioError(f"{path} is a folder but not a diffusers pipeline (no model_index.json in it)")
        return "folder"
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise StudioError(f"refusing to load {path.name}: {suffix} checkpoints are pickles, which can run any code. "
                          "Convert it to .safetensors, or pass --allow-pickle if you trust its source.")
    if suffix in PICKLE_SUFFIXES or suffix == ".safetensors":
        if not path.is_file():
            raise StudioError(f"checkpoint not found: {path}")
        return "single-file"
    if HUB_ID.match(source) and not path.exists():
        return "hub"
    raise StudioError(f"model {source!r} not found: give 'builtin', a diffusers folder, a .safetensors "
                      "checkpoint, or a hub id like 'owner/name'")


def family_for(source, kind: str):
    """The model family that loads `source`: read from a diffusers folder's model_index.json; SD otherwise."""
    if kind != "folder":
        return models.FAMILIES[0]
    name = json.loads((Path(source).expanduser() / "model_index.json").read_text()).get("_class_name", "")
    for family in models.FAMILIES:
        if name in family.pipeline_names:
            return family
    raise StudioError(f"{source} holds a {name or 'unnamed'} pipeline; the studio runs "
                      f"{', '.join(f.title for f in models.FAMILIES)} models")


def load_pipeline(source: str = BUILTIN, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False):
    """Load a pipeline of a known model family onto the device; returns (pipe, ModelInfo)."""
    kind = classify_source(source, allow_pickle)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    try:
        if kind == "builtin-demo":
            from .demo_model import build_demo_pipeline

            pipe = build_demo_pipeline()
        else:
            where = TOY_MODEL if kind == "builtin-toy" else source
            pipe = family_for(where, "folder" if kind == "builtin-toy" else kind).load(where, kind, dt)
    except StudioError:
        raise
    except Exception as exc:
        hint = " (no network? hub ids need one; a local folder or file does not)" if kind == "hub" else ""
        raise StudioError(f"could not load {source!r} as a Stable Diffusion pipeline{hint}: {exc}") from exc
    for c in ("text_encoder", "unet", "vae"):  # on the device, in the asked dtype whatever was saved, frozen
        getattr(pipe, c).to(dev).to(dtype=dt).requires_grad_(False).eval()
    pipe.set_progress_bar_config(disable=True)
    name = BUILTIN if kind.startswith("builtin") else source
    return pipe, ModelInfo(name, kind, str(dev), str(dt).replace("torch.", ""))
