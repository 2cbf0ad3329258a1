"""Export what the edits changed as a LoRA file other tools can load, or the whole edited model.

A LoRA is portable (A1111, ComfyUI, diffusers `load_lora_weights`) and small: each changed Linear
weight's delta is factored by a truncated SVD. Keys are kohya's, which those tools all read (the
family's `lora_key`, + `.lora_down.weight`, `.lora_up.weight`, `.alpha`). Loaders scale each module by
alpha/rank. One alpha is written for every module (the largest module rank) and `up` is pre-multiplied
by rank/alpha where a module's rank was capped lower, because diffusers 0.42 drops per-module alphas of
UNet attention layers (its alpha_pattern keys keep the old 'processor.to_k_lora' names and match
nothing), which would silently mis-scale them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import models, steering
from .edit_files import save_tensors
from .edits import find_tensor
from .errors import StudioError


def weight_changes(manager, since: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (value before the applied edits after `since` touched it, current value), CPU copies."""
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
    """Factor each 2-D Linear weight delta at `rank`; `factors` ({name: (down, up)}, a concept's own LoRA)
    go in as they are. What a LoRA cannot carry is skipped and listed in the report. With `pipe`, layer
    types are checked exactly; without it, 2-D '.weight' tensors outside embeddings count as Linear (an
    embedding table is 2-D but no loader applies a LoRA to it)."""
    if not isinstance(rank, int) or rank < 1:
        raise StudioError(f"LoRA rank must be a positive integer, got {rank!r}")
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
    """The first `n` skipped changes and why, for a message."""
    return "; ".join(f"{name}: {why}" for name, why in list(report["skipped"].items())[:n])


def save_lora(state: dict, report: dict, path, rank: int, metadata: dict) -> Path:
    """Write a LoRA from `lora_from_changes` with the kohya metadata A1111 and ComfyUI read."""
    dim = str(report["alpha"])  # the largest rank actually used (a requested rank is capped at the layer's size)
    metadata = {**metadata, "ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
                "studio_rank_requested": rank, "studio_error": f"{report['error']:.6g}"}
    if any(v.dim() == 4 for k, v in state.items() if k.endswith(".lora_down.weight")):
        metadata["ss_network_args"] = json.dumps({"conv_dim": dim, "conv_alpha": dim})  # kohya LoCon
    path = save_tensors(state, path, metadata)
    report["path"] = str(path)
    return path


def export_lora(manager, path, rank: int = 4, since: int = 0) -> dict:
    """Write the applied edits after `since` as a kohya-style LoRA .safetensors; returns the report."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise StudioError(f"LoRA files are written as .safetensors; {path.name!r} has another extension")
    with manager.lock:
        changes = weight_changes(manager, since)  # validates `since`
        entries = manager.stack.applied[since:]
        state, report = lora_from_changes(changes, rank, manager.pipe)
        titles = [e.edit.title for e in entries]
        no_weights = [e.edit.title for e in entries if not e.patch.originals]
    if not state:
        why = skipped_text(report, 5)
        raise StudioError("nothing to export: the applied edits changed no Linear weight of the UNet or text encoder"
                          + (f" ({why})" if why else " (apply a weight edit first)"))
    report["edits"], report["not_exported_edits"] = titles, no_weights  # e.g. processor swaps change no weight
    save_lora(state, report, path, rank, {"studio_edits": json.dumps(titles)})
    return report


def export_pipeline(manager, folder) -> Path:
    """Save the whole edited pipeline as a diffusers folder (safetensors), exact at any edit size."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise StudioError(f"{folder} already exists and is not empty: choose a new or empty folder")
    with manager.lock:
        acting = steering.describe(manager.pipe)
        if acting:
            raise StudioError(f"{'; '.join(acting)} act on generations without being in the weights a saved pipeline "
                              "holds: undo them, or set a learned concept's scope to 'every prompt' first, or export "
                              "it as embedding + LoRA from the Customize tab")
        manager.pipe.save_pretrained(folder, safe_serialization=True)
    return folder
