"""What the edits changed as a kohya-keyed LoRA (SVD of each Linear delta), or the whole model. One alpha for all
modules, `up` pre-scaled where a rank was capped: diffusers 0.42 drops UNet attention layers' own alphas."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import models, steering
from .checks import whole
from .edit_files import save_tensors
from .edits import find_tensor
from .errors import StudioError


def weight_changes(manager, since: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (value before the edits after `since`, current value), CPU copies."""
    with manager.lock:
        applied = manager.stack.applied
        if not 0 <= since <= len(applied):
            raise StudioError(f"'since' must be between 0 and {len(applied)} (the applied edits), got {since}")
        originals: dict[str, torch.Tensor] = {}
        for entry in applied[since:]:
            for name, value in entry.patch.originals.items():
                originals.setdefault(name, value)  # the earliest edit's backup is the value at `since`
        pipe = manager.pipe
        return {n: (o.clone(), find_tensor(pipe, n).detach().to("cpu", copy=True)) for n, o in originals.items()}


def lora_from_changes(changes: dict, rank: int, pipe=None, factors: dict | None = None) -> tuple[dict, dict]:
    """Each 2-D Linear delta factored at `rank`, `factors` ({name: (down, up)}) as given; the rest skipped, reported."""
    rank = whole("LoRA rank", rank, 1)
    family = models.of(pipe) if pipe is not None else models.StableDiffusion
    layers = set(family.lora_weights().values()) if pipe is not None else None
    factors, pairs, modules = factors or {}, {}, {}
    skipped = {n: f"{n.partition('.')[0]} weights are not part of a LoRA" for n in [*sorted(changes), *factors]
               if n.partition(".")[0] not in family.lora_prefixes}
    err2 = total2 = 0.0
    for name, (original, current) in sorted(changes.items()):
        if name in skipped:
            continue
        delta = current.float() - original.float()
        linear = name in layers if layers is not None else "embedding" not in name.split(".")[-2]
        if not (name.endswith(".weight") and delta.dim() == 2 and linear):
            skipped[name] = f"not a Linear weight (shape {tuple(delta.shape)}): LoRA cannot carry it"
        elif (norm := torch.linalg.matrix_norm(delta).item()) == 0.0:
            skipped[name] = "unchanged"
        else:
            r = min(rank, *delta.shape)
            U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
            root = S[:r].sqrt()
            down, up = pairs[name] = (root[:, None] * Vh[:r]).float(), (U[:, :r] * root).float()
            err = torch.linalg.matrix_norm(delta - up @ down).item()
            modules[name] = {"key": family.lora_key(name), "rank": r, "error": err / norm, "source": "svd"}
            err2, total2 = err2 + err**2, total2 + norm**2
    for name, (down, up) in factors.items():
        if name not in skipped:
            pairs[name] = down, up
            modules[name] = {"key": family.lora_key(name), "rank": down.shape[0], "error": 0.0, "source": "factors"}
    alpha = max((m["rank"] for m in modules.values()), default=None)
    state = {}
    for name, (down, up) in pairs.items():  # one alpha for all (see the module docstring); alpha/r undone in up
        key, r = modules[name]["key"], modules[name]["rank"]
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = (up * (r / alpha)).contiguous()
        state[f"{key}.alpha"] = torch.tensor(float(alpha))
    report = {"rank": rank, "alpha": alpha, "modules": modules, "skipped": skipped,
              "error": (err2 / total2) ** 0.5 if total2 else 0.0,
              "max_error": max((m["error"] for m in modules.values()), default=0.0)}
    return state, report


def skipped_text(report: dict, n: int = 3) -> str:
    return "; ".join(f"{name}: {why}" for name, why in list(report["skipped"].items())[:n])


def save_lora(state: dict, report: dict, path, rank: int, metadata: dict) -> Path:
    """Write a LoRA with the kohya metadata A1111 and ComfyUI read."""
    dim = str(report["alpha"])  # the largest rank used (a requested rank is capped at the layer's size)
    metadata = {**metadata, "ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
                "studio_rank_requested": rank, "studio_error": f"{report['error']:.6g}"}
    if any(v.dim() == 4 for k, v in state.items() if k.endswith(".lora_down.weight")):
        metadata["ss_network_args"] = json.dumps({"conv_dim": dim, "conv_alpha": dim})  # kohya LoCon
    path = save_tensors(state, path, metadata)
    report["path"] = str(path)
    return path


def export_lora(manager, path, rank: int = 4, since: int = 0) -> dict:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise StudioError(f"LoRA files are written as .safetensors; {path.name!r} has another extension")
    with manager.lock:
        state, report = lora_from_changes(weight_changes(manager, since), rank, manager.pipe)
        entries = manager.stack.applied[since:]
        report["edits"] = [e.edit.title for e in entries]
        report["not_exported_edits"] = [e.edit.title for e in entries if not e.patch.originals]  # e.g. processor swaps
    if not state:
        why = skipped_text(report, 5)
        raise StudioError("nothing to export: the applied edits changed no Linear weight of the UNet or text encoder"
                          + (f" ({why})" if why else " (apply a weight edit first)"))
    save_lora(state, report, path, rank, {"studio_edits": json.dumps(report["edits"])})
    return report


def export_pipeline(manager, folder) -> Path:
    """The whole edited pipeline as a diffusers folder: exact at any edit size."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise StudioError(f"{folder} already exists and is not empty: choose a new or empty folder")
    with manager.lock:
        if acting := steering.describe(manager.pipe):
            raise StudioError(f"{'; '.join(acting)} act on generations but are not in the weights: undo them, set "
                              "a concept's scope to 'every prompt', or export it as embedding + LoRA (Customize tab)")
        manager.pipe.save_pretrained(folder, safe_serialization=True)
    return folder
