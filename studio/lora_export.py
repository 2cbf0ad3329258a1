"""Export what the edits changed as a LoRA file other tools can load, or the whole edited model.

A LoRA is portable (A1111, ComfyUI, diffusers `load_lora_weights`) and small: each changed Linear
weight's delta is factored by a truncated SVD. Keys use the kohya naming those tools all read
(`lora_unet_<path>` / `lora_te_<path>`, `.lora_down.weight`, `.lora_up.weight`, `.alpha`).
Loaders scale each module by alpha/rank. One alpha is written for every module (the largest module
rank) and `up` is pre-multiplied by rank/alpha where a module's rank was capped lower, because
diffusers 0.42 drops per-module alphas of UNet attention layers (its alpha_pattern keys keep the
old 'processor.to_k_lora' names and match nothing), which would silently mis-scale them.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

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


def _is_linear(pipe, name: str) -> bool:
    component, _, rest = name.partition(".")
    module_path = rest.rpartition(".")[0]
    try:
        return isinstance(getattr(pipe, component).get_submodule(module_path), torch.nn.Linear)
    except AttributeError:
        return False


def kohya_name(name: str) -> str:
    """'unet.a.b.weight' -> 'lora_unet_a_b'; 'text_encoder.encoder.x.weight' -> 'lora_te_text_model_encoder_x'.
    transformers 5 dropped CLIPTextModel's `text_model` wrapper; kohya names (what A1111/ComfyUI read)
    keep it, and diffusers strips it again when the encoder has none."""
    component, _, rest = name.partition(".")
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}.get(component)
    if prefix is None:
        raise StudioError(f"{name}: only unet and text_encoder weights can go into a LoRA")
    if component == "text_encoder" and not rest.startswith("text_model."):
        rest = "text_model." + rest
    return prefix + rest.rpartition(".")[0].replace(".", "_")


def lora_from_changes(changes: dict, rank: int, pipe=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Factor each 2-D Linear weight delta at `rank`; the rest is skipped and listed in the report.
    With `pipe`, module types are checked exactly; without it, 2-D '.weight' tensors outside
    embeddings count as Linear (an embedding table is 2-D but no loader applies a LoRA to it)."""
    if not isinstance(rank, int) or rank < 1:
        raise StudioError(f"LoRA rank must be a positive integer, got {rank!r}")
    state, modules, skipped = {}, {}, {}
    err2 = total2 = 0.0
    for name, (original, current) in sorted(changes.items()):
        delta = current.float() - original.float()
        module = name.rpartition(".")[0]
        linear = _is_linear(pipe, name) if pipe is not None else "embedding" not in module.rpartition(".")[2]
        if name.startswith("vae."):
            skipped[name] = "VAE weights are not part of an SD LoRA"
            continue
        if not (name.endswith(".weight") and delta.dim() == 2 and linear):
            skipped[name] = f"not a Linear weight (shape {tuple(delta.shape)}): LoRA cannot carry it"
            continue
        norm = torch.linalg.matrix_norm(delta).item()
        if norm == 0.0:
            skipped[name] = "unchanged"
            continue
        r = min(rank, *delta.shape)
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        root = S[:r].sqrt()
        up, down = (U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float()
        err = torch.linalg.matrix_norm(delta - up @ down).item()
        key = kohya_name(name)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = down.contiguous(), up
        modules[name] = {"key": key, "rank": r, "error": err / norm}
        err2, total2 = err2 + err**2, total2 + norm**2
    alpha = max((m["rank"] for m in modules.values()), default=rank)
    for m in modules.values():  # one alpha for all (see the module docstring); scale alpha/r undone in `up`
        state[f"{m['key']}.alpha"] = torch.tensor(float(alpha))
        state[f"{m['key']}.lora_up.weight"] = (state[f"{m['key']}.lora_up.weight"] * (m["rank"] / alpha)).contiguous()
    report = {"rank": rank, "alpha": alpha, "modules": modules, "skipped": skipped,
              "error": (err2 / total2) ** 0.5 if total2 else 0.0,
              "max_error": max((m["error"] for m in modules.values()), default=0.0)}
    return state, report


def export_lora(manager, path, rank: int = 4, since: int = 0) -> dict:
    """Write the applied edits after `since` as a kohya-style LoRA .safetensors; returns the report."""
    from safetensors.torch import save_file

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
        why = "; ".join(f"{n}: {r}" for n, r in list(report["skipped"].items())[:5])
        raise StudioError("nothing to export: the applied edits changed no Linear weight of the UNet or text encoder"
                          + (f" ({why})" if why else " (apply a weight edit first)"))
    report["edits"], report["not_exported_edits"] = titles, no_weights  # e.g. processor swaps change no weight
    dim = str(report["alpha"])  # the largest rank actually used (a requested rank is capped at the layer's size)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": dim, "ss_network_alpha": dim,
            "studio_rank_requested": str(rank), "studio_edits": json.dumps(titles),
            "studio_error": f"{report['error']:.6g}"}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)
    report["path"] = str(path)
    return report


def export_pipeline(manager, folder) -> Path:
    """Save the whole edited pipeline as a diffusers folder (safetensors), exact at any edit size."""
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise StudioError(f"{folder} already exists and is not empty: choose a new or empty folder")
    from .customize.concept import scope_of

    with manager.lock:
        hooked = [e.edit.title for e in manager.stack.applied if e.edit.kind == "learned_concept"
                  and scope_of(e.edit.params) == "prompt" and e.edit.params.get("modules")]
        if hooked:
            raise StudioError(f"{', '.join(hooked)} act only on prompts that use their token, so their changes are not "
                              "in the weights a saved pipeline holds: set their scope to 'every prompt' first, or "
                              "export them as embedding + LoRA from the Customize tab")
        manager.pipe.save_pretrained(folder, safe_serialization=True)
    return folder
