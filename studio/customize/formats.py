"""Learned concepts in the files other tools load, and back.

Export (`export_concept`) writes, per requested format:
- "embedding": `<name>.safetensors` holding `{"emb_params": [vectors, d]}`, the textual-inversion
  file A1111 and ComfyUI load (A1111 calls it by the file name: `<name>` is the token without its
  angle brackets); diffusers loads it with `pipe.load_textual_inversion(path, token="<x>")`.
- "lora": `<name>-lora.safetensors` with kohya keys (`lora_unet_...`, `.lora_down/.lora_up/.alpha`)
  as A1111, ComfyUI and diffusers' `pipe.load_lora_weights(path)` read them. A concept's own LoRA
  factors go in as they are (conv factors 4-D, as kohya LoCon writes them); full deltas (Custom
  Diffusion's K/V) are factored by lora_export's truncated SVD at `rank`, with the error reported.
  The token is not in the LoRA: load the embedding file next to it.
- "custom_diffusion": a folder `<name>-custom-diffusion/` laid out as diffusers' Custom Diffusion
  training script leaves it: `pytorch_custom_diffusion_weights.safetensors` (the full trained
  K/V weights under `<attention>.processor.to_k_custom_diffusion.weight`, ...) and the token in
  `learned_embeds.safetensors` (`{token: vectors}`). In diffusers 0.42:
      pipe.load_textual_inversion(folder)
      pipe.unet.load_attn_procs(folder, weight_name="pytorch_custom_diffusion_weights.safetensors",
                                _pipeline=pipe)
  `_pipeline` is needed: without it 0.42 builds the processors and never installs them (diffusers
  issue #9320). The file also holds an empty placeholder for every attention without weights,
  because `set_attn_processor` wants a processor for every attention layer and safetensors cannot
  store the empty dicts `save_attn_procs` puts there.

Import (`import_concept`) reads those files, diffusers' `learned_embeds.safetensors`, A1111 `.pt`
embeddings (only through `torch.load(weights_only=True)`: nothing that needs arbitrary unpickling)
and kohya LoRAs (diffusers or original-SD block names), and returns one "learned_concept" Edit,
not yet applied. It checks everything against the model first (names, shapes, widths, the token),
so a file for another architecture is refused before anything touches the model.
"""
from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from ..edits import Edit, find_tensor
from ..errors import StudioError
from ..lora_export import kohya_name, lora_from_changes
from .concept import (MAX_VECTORS, TOKEN_PATTERN, base_signature, check_strength, check_token, concept_label,
                      weight_delta)

FORMATS = ("embedding", "lora", "custom_diffusion")
CD_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
EMBEDS = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
TENSOR_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
CD_PARTS = {"to_k_custom_diffusion.weight": "to_k.weight", "to_v_custom_diffusion.weight": "to_v.weight",
            "to_q_custom_diffusion.weight": "to_q.weight", "to_out_custom_diffusion.0.weight": "to_out.0.weight",
            "to_out_custom_diffusion.0.bias": "to_out.0.bias"}
CD_KEY = re.compile(r"^(.*)\.processor\.(to_[kvq]_custom_diffusion\.weight|to_out_custom_diffusion\.0\.(?:weight|bias))$")
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
LYCORIS_PARTS = ("hada_", "lokr_", "lora_mid", "dora_scale", "diff", "on_input", "w_norm", "b_norm")


# -- helpers ------------------------------------------------------------------------------------
def _pipe_of(model):
    """(pipeline, manager or None) from a PipelineManager or a pipeline."""
    if model is None:
        return None, None
    if hasattr(model, "stack") and hasattr(model, "lock"):
        return model.pipe, model
    return model, None


def _base_value(model, name: str) -> torch.Tensor:
    """Weight `name` of the model as loaded: with a manager, the value before any applied edit touched
    it; with a bare pipeline, its current value (the concept must not be applied there)."""
    pipe, manager = _pipe_of(model)
    if manager is not None:
        with manager.lock:
            for entry in manager.stack.applied:
                if name in entry.patch.originals:
                    return entry.patch.originals[name].clone()
    return find_tensor(pipe, name).detach().to("cpu", copy=True)


def file_stem(token: str | None, fallback: str = "concept") -> str:
    """A file name for a token: '<my-cat>' -> 'my-cat' (what A1111 calls an embedding by)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", str(token or "").strip("<>")).strip("-.")
    return stem or fallback


def _save(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path


def _concept_parts(edit: Edit):
    if not isinstance(edit, Edit) or edit.kind != "learned_concept":
        raise StudioError(f"only learned concepts can be exported this way (got {getattr(edit, 'title', edit)!r})")
    params, tensors = edit.params, edit.tensors
    return params, tensors, params.get("token"), check_strength(params.get("strength", 1.0))


def is_attention_projection(name: str) -> bool:
    return re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$", name) is not None


# -- export -------------------------------------------------------------------------------------
def embedding_state(edit: Edit) -> dict[str, torch.Tensor]:
    """The A1111/ComfyUI textual-inversion file's tensors: {"emb_params": [vectors, d]}."""
    params, tensors, token, _ = _concept_parts(edit)
    if token is None or "embedding" not in tensors:
        raise StudioError("this concept has no token (a weights-only concept such as an imported LoRA): "
                          "there is no embedding to export")
    return {"emb_params": tensors["embedding"].detach().float().cpu().contiguous()}


def lora_state(edit: Edit, rank: int = 16, pipe=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Kohya-key LoRA tensors of the concept's weight changes at its strength, and a report.

    LoRA factors are written as they are; full deltas are factored at `rank` (lora_export's SVD).
    One alpha for every module (the largest rank), `up` scaled by rank/alpha where a module's rank
    is lower, as lora_export does (diffusers 0.42 drops per-module alphas of UNet attention)."""
    params, tensors, _, strength = _concept_parts(edit)
    factors, deltas, skipped = {}, {}, {}
    for name in params.get("modules", []):
        if name.startswith("vae."):
            skipped[name] = "VAE weights are not part of an SD LoRA"
        elif f"{name}.lora_A" in tensors:
            a, b = tensors[f"{name}.lora_A"].detach().float().cpu(), tensors[f"{name}.lora_B"].detach().float().cpu()
            factors[name] = (a, b if strength == 1.0 else b * strength)
        elif f"{name}.delta" in tensors:
            d = tensors[f"{name}.delta"].detach().float().cpu()
            deltas[name] = (torch.zeros_like(d), d if strength == 1.0 else d * strength)
        else:
            raise StudioError(f"this concept lacks the change of {name}: it is damaged; train or import it again")
    state, modules = {}, {}
    report = {"rank": rank, "error": 0.0, "max_error": 0.0, "skipped": skipped}
    svd_alpha = None
    if deltas:
        svd_state, svd_report = lora_from_changes(deltas, rank, pipe)
        svd_alpha = svd_report["alpha"]
        state.update(svd_state)
        skipped.update(svd_report["skipped"])
        for name, m in svd_report["modules"].items():
            modules[name] = {**m, "source": "svd"}
        report.update(error=svd_report["error"], max_error=svd_report["max_error"])
    elif not isinstance(rank, int) or rank < 1:
        raise StudioError(f"LoRA rank must be a positive integer, got {rank!r}")
    for name, (a, b) in factors.items():
        key = kohya_name(name)
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = a.contiguous(), b.contiguous()
        modules[name] = {"key": key, "rank": a.shape[0], "error": 0.0, "source": "factors"}
    if not modules:
        report.update(alpha=None, modules={})
        return {}, report
    alpha = max(m["rank"] for m in modules.values())
    for name, m in modules.items():
        up = f"{m['key']}.lora_up.weight"
        # svd modules carry up * r / svd_alpha; factor modules carry up as trained (scale 1)
        have = svd_alpha if m["source"] == "svd" else m["rank"]
        if have != alpha:
            state[up] = (state[up] * (have / alpha)).contiguous()
        state[f"{m['key']}.alpha"] = torch.tensor(float(alpha))
    report.update(alpha=alpha, modules=modules)
    return state, report


def custom_diffusion_state(edit: Edit, model) -> tuple[dict[str, torch.Tensor], dict]:
    """The concept's attention changes as diffusers' Custom Diffusion file: full weights (base + change
    at the concept's strength) per attention processor, an empty placeholder for the others."""
    params, tensors, _, strength = _concept_parts(edit)
    pipe, _ = _pipe_of(model)
    if pipe is None:
        raise StudioError("Custom Diffusion files hold full weights: export them with the model the concept "
                          "was learned on (model=manager)")
    if params.get("base_model") and params["base_model"] != base_signature(pipe):
        raise StudioError(f"{params.get('token') or 'this concept'} was learned on another model: load that model to "
                          "export its Custom Diffusion weights")
    modules = list(params.get("modules", []))
    other = [n for n in modules if not (n.startswith("unet.") and is_attention_projection(n))]
    if other:
        raise StudioError(f"Custom Diffusion files carry only attention projections; {len(other)} changed weights "
                          f"(e.g. {other[0]}) would be lost: export this concept as a LoRA")
    if not modules:
        raise StudioError("this concept changes no weights: export its embedding instead")
    touched: dict[str, set] = {}
    for n in modules:
        attn, part = re.match(r"unet\.(.*\.attn[12])\.(.*)$", n).groups()
        touched.setdefault(attn, set()).add(part)
    state, written = {}, []
    for proc in pipe.unet.attn_processors:
        attn = proc.removesuffix(".processor")
        if attn not in touched:
            state[proc] = torch.zeros(0)  # load_attn_procs: an attention with default behaviour
            continue
        parts = ["to_k.weight", "to_v.weight"]  # the loader reads the shapes from to_k; k and v go together
        if touched[attn] & {"to_q.weight", "to_out.0.weight", "to_out.0.bias"}:
            parts += ["to_q.weight", "to_out.0.weight", "to_out.0.bias"]
        for part in parts:
            name = f"unet.{attn}.{part}"
            base = _base_value(model, name)
            delta = weight_delta(tensors, name, base.shape) if name in modules else None
            value = base if delta is None else (base.float() + strength * delta).to(base.dtype)
            cd_part = next(k for k, v in CD_PARTS.items() if v == part)
            state[f"{proc}.{cd_part}"] = value.contiguous()
            written.append(name)
    return state, {"modules": written, "attention_layers": len(touched)}


def export_concept(edit: Edit, folder, formats=FORMATS, rank: int = 16, model=None, name: str | None = None) -> dict:
    """Write the concept in each of `formats` into `folder`; returns what was written, per format the
    error that stopped it, and notes. `model` (the PipelineManager or pipeline the concept belongs to)
    is needed for Custom Diffusion (full weights) and checks LoRA layer types; `rank` is the LoRA rank
    for full deltas (a concept's own LoRA factors keep theirs)."""
    params, tensors, token, strength = _concept_parts(edit)
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise StudioError(f"unknown export format(s) {', '.join(map(repr, unknown)) or '(none)'}: choose from "
                          f"{', '.join(FORMATS)}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"{folder} is a file: choose a folder to export into")
    stem = file_stem(name or token or params.get("name"))
    pipe, _ = _pipe_of(model)
    meta = {"studio_token": token or "", "studio_vectors": len(tensors.get("embedding", ())) if token else 0,
            "studio_base_model": params.get("base_model") or "", "studio_method": params.get("method", "")}
    out = {"written": {}, "errors": {}, "notes": [], "lora": None, "custom_diffusion": None}
    if strength != 1.0:
        out["notes"].append(f"the weight changes are written at the concept's strength {strength:g}")
    for fmt in formats:
        try:
            if fmt == "embedding":
                path = _save(embedding_state(edit), folder / f"{stem}.safetensors", {**meta, "format": "pt"})
                out["written"]["embedding"] = [str(path)]
                out["notes"].append(f"embedding: A1111/ComfyUI call it '{stem}' (the file name); diffusers: "
                                    f"pipe.load_textual_inversion('{path}', token='{token}')")
            elif fmt == "lora":
                state, report = lora_state(edit, rank, pipe)
                if not state:
                    why = "; ".join(f"{n}: {r}" for n, r in list(report["skipped"].items())[:3])
                    raise StudioError("this concept changes no weight a LoRA can carry" + (f" ({why})" if why else
                                      " (a token-only concept: export its embedding)"))
                dim = str(report["alpha"])
                lmeta = {**meta, "ss_network_module": "networks.lora", "ss_network_dim": dim,
                         "ss_network_alpha": dim, "studio_rank_requested": str(rank),
                         "studio_error": f"{report['error']:.6g}"}
                if any(state[f"{m['key']}.lora_down.weight"].dim() == 4 for m in report["modules"].values()):
                    lmeta["ss_network_args"] = json.dumps({"conv_dim": dim, "conv_alpha": dim})
                path = _save(state, folder / f"{stem}-lora.safetensors", lmeta)
                report["path"] = str(path)
                out["written"]["lora"], out["lora"] = [str(path)], report
                if any(m["source"] == "svd" for m in report["modules"].values()):
                    out["notes"].append(f"lora: full changes factored at rank {rank}, relative error "
                                        f"{report['error']:.3g} (largest per layer {report['max_error']:.3g})")
                if report["skipped"]:
                    out["notes"].append(f"lora: {len(report['skipped'])} changes not in the LoRA: "
                                        + "; ".join(f"{n}: {r}" for n, r in list(report["skipped"].items())[:3]))
                if token:
                    out["notes"].append(f"lora: the token {token} is not in the LoRA; load the embedding with it")
            elif fmt == "custom_diffusion":
                state, report = custom_diffusion_state(edit, model)
                sub = folder / f"{stem}-custom-diffusion"
                paths = [_save(state, sub / CD_WEIGHTS, {"format": "pt", **meta})]
                if token:
                    emb = tensors["embedding"].detach().float().cpu()
                    paths.append(_save({token: emb[0] if len(emb) == 1 else emb}, sub / EMBEDS, {"format": "pt"}))
                out["written"]["custom_diffusion"] = [str(p) for p in paths]
                out["custom_diffusion"] = {**report, "folder": str(sub)}
                out["notes"].append(f"custom_diffusion: diffusers: pipe.load_textual_inversion('{sub}'); "
                                    f"pipe.unet.load_attn_procs('{sub}', weight_name='{CD_WEIGHTS}', _pipeline=pipe)")
        except StudioError as exc:
            out["errors"][fmt] = str(exc)
    return out


# -- reading files ------------------------------------------------------------------------------
def _flatten(obj, prefix: str = "") -> dict:
    """Nested dicts of a torch.load result as 'a.b' keys; tensors and plain values kept."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}." if isinstance(v, dict) else f"{prefix}{k}"))
            if isinstance(v, dict) and not v:
                out[f"{prefix}{k}"] = {}
        return out
    return {prefix.rstrip("."): obj}


def read_file(path) -> tuple[dict, dict]:
    """(tensors and plain values by key, metadata) of a safetensors file, or of a pickle checkpoint that
    `torch.load(weights_only=True)` can read without running code; anything else is refused."""
    path = Path(path)
    if not path.is_file():
        raise StudioError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise StudioError(f"{path.name} is empty (0 bytes)")
    if suffix in TENSOR_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise StudioError(f"{path.name} is not a readable safetensors file: {exc}") from None
    elif suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise StudioError(f"{path.name}: pickle checkpoint: convert it to safetensors. It holds Python objects "
                              + (f"({needs.group(1)}) " if needs else "") + "that only a full unpickle can rebuild, "
                              "and unpickling can run arbitrary code: Concept Studio reads only plain tensors") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise StudioError(f"{path.name} is not a readable PyTorch file: {exc}") from None
        if torch.is_tensor(obj):
            obj = {"": obj}
        if not isinstance(obj, dict):
            raise StudioError(f"{path.name} holds a {type(obj).__name__}, not tensors by name")
        state, meta = _flatten(obj), {}
    else:
        raise StudioError(f"{path.name}: unsupported file type {suffix or '(none)'}; concepts come as .safetensors "
                          "(or as .pt/.bin embeddings)")
    if not any(torch.is_tensor(v) and v.numel() for v in state.values()):
        raise StudioError(f"{path.name} is empty: it holds no tensors")
    return state, meta


def detect_format(state: dict) -> str:
    """'embedding', 'lora' (kohya keys), 'custom_diffusion', or a StudioError naming the unknown keys."""
    keys = [k for k, v in state.items() if torch.is_tensor(v)]
    if any("_custom_diffusion." in k for k in keys):
        return "custom_diffusion"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "lora"
    if "emb_params" in state or any(k.startswith("string_to_param.") for k in keys):
        return "embedding"
    if "clip_l" in state and "clip_g" in state:
        raise StudioError("this is an SDXL embedding (clip_l + clip_g): it is for another architecture")
    tensors = [k for k in keys if state[k].numel()]
    if len(tensors) == 1 and state[tensors[0]].dim() in (1, 2) and not tensors[0].endswith((".weight", ".bias")):
        return "embedding"  # diffusers' learned_embeds: {token: vectors}
    if any(k.endswith((".lora_A.weight", ".lora_B.weight")) or ".lora.down." in k or "_lora.down." in k
           for k in keys):
        raise StudioError("this is a diffusers/peft-format LoRA (keys like unet....lora_A.weight); load it with "
                          "diffusers' load_lora_weights, or convert it to kohya keys first")
    raise StudioError(f"unknown file contents: keys such as {', '.join(keys[:4])} are neither an embedding, a kohya "
                      "LoRA nor Custom Diffusion weights")


# -- import -------------------------------------------------------------------------------------
def kohya_module_map(pipe) -> dict[str, str]:
    """kohya LoRA name -> pipeline weight name, over every Linear and Conv2d of the UNet and text encoder."""
    out = {}
    for component in ("unet", "text_encoder"):
        module = getattr(pipe, component, None)
        if module is None:
            continue
        for n, m in module.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)) and ".base_layer" not in n and ".lora_" not in n:
                out.setdefault(kohya_name(f"{component}.{n}.weight"), f"{component}.{n}.weight")
    return out


def _embedding_from(state: dict, meta: dict, path: Path, default: str | None = None) -> tuple[torch.Tensor, str]:
    """(vectors [n, d], the token the file names) of an embedding file."""
    default = default or path.stem
    if "emb_params" in state:
        vec, name = state["emb_params"], meta.get("studio_token") or default
    elif "string_to_param.*" in state:
        vec = state["string_to_param.*"]
        name = state.get("name") if isinstance(state.get("name"), str) and state.get("name") else default
    else:
        key = next(k for k, v in state.items() if torch.is_tensor(v) and v.numel())
        vec, name = state[key], key or default
    if not torch.is_tensor(vec) or vec.dim() not in (1, 2) or not vec.numel():
        raise StudioError(f"{path.name}: the embedding has shape {tuple(getattr(vec, 'shape', ()))}, expected "
                          "[vectors, width]")
    vec = vec.detach().float().reshape(-1, vec.shape[-1]).contiguous()
    if not torch.isfinite(vec).all():
        raise StudioError(f"{path.name}: the embedding holds NaN or infinite values")
    if len(vec) > MAX_VECTORS:
        raise StudioError(f"{path.name}: {len(vec)} vectors; at most {MAX_VECTORS} are supported")
    return vec, name


def _lora_from(state: dict, path: Path, pipe) -> dict[str, torch.Tensor]:
    """Concept tensors ({name}.lora_A/B, scale alpha/rank folded into B) of a kohya LoRA."""
    if pipe is None:
        raise StudioError(f"{path.name}: importing a LoRA needs the model (pipe=...) to map its kohya names back to "
                          "the model's layers")
    bad = sorted({k.split(".", 1)[1] for k in state if "." in k and k.split(".", 1)[1].startswith(LYCORIS_PARTS)})
    if bad:
        raise StudioError(f"{path.name} is a LyCORIS/DoRA network ({', '.join(bad[:3])}): only plain LoRA "
                          "(lora_down/lora_up/alpha) can be imported")
    if any(k.startswith("lora_te2_") for k in state):
        raise StudioError(f"{path.name} is an SDXL LoRA (two text encoders): it is for another architecture")
    state = {re.sub(r"^lora_te1_", "lora_te_", k): v for k, v in state.items() if torch.is_tensor(v)}
    if any(p in k for k in state for p in ("input_blocks", "middle_block", "output_blocks")):
        from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

        try:
            state = _maybe_map_sgm_blocks_to_diffusers(dict(state), pipe.unet.config)
            renames = (("_input_blocks_", "_down_blocks_"), ("_middle_block_", "_mid_block_"),
                       ("_output_blocks_", "_up_blocks_"))
            for a, b in renames:  # the block indices are mapped above, the names are left to us
                state = {k.replace(a, b, 1): v for k, v in state.items()}
        except (ValueError, IndexError, KeyError) as exc:
            raise StudioError(f"{path.name}: its original-SD block names do not fit this UNet ({exc}): it is for "
                              "another architecture") from None
    groups: dict[str, dict] = {}
    for key, value in state.items():
        lora_name, _, part = key.partition(".")
        if part not in LORA_PARTS or not lora_name.startswith(("lora_unet_", "lora_te_")):
            raise StudioError(f"{path.name}: unknown key {key!r} (a kohya LoRA has <layer>.lora_down.weight, "
                              ".lora_up.weight and .alpha)")
        groups.setdefault(lora_name, {})[part] = value
    names = kohya_module_map(pipe)
    missing = [k for k in groups if k not in names]
    if missing:
        raise StudioError(f"{path.name} does not fit this model: {len(missing)} of its {len(groups)} layers are not "
                          f"in it (e.g. {missing[0]}): it was made for another architecture")
    out = {}
    for lora_name, parts in sorted(groups.items()):
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise StudioError(f"{path.name}: {lora_name} lacks its lora_down or lora_up weight: the file is damaged")
        down, up = parts["lora_down.weight"].detach().float(), parts["lora_up.weight"].detach().float()
        name = names[lora_name]
        shape = tuple(find_tensor(pipe, name).shape)
        r = down.shape[0]
        if len(shape) == 4:  # conv: down is a conv of the layer's kernel (or a flat 1x1), up a 1x1 conv
            fits = down.dim() in (2, 4) and (down.dim() == 2 or tuple(down.shape[1:]) == shape[1:]) \
                and down.flatten(1).shape[1] == math.prod(shape[1:])
        else:  # linear (down/up may come as 1x1 convs)
            fits = down.dim() in (2, 4) and (down.dim() == 2 or tuple(down.shape[2:]) == (1, 1)) \
                and down.flatten(1).shape[1] == shape[1]
        fits = fits and up.dim() in (2, 4) and (up.dim() == 2 or tuple(up.shape[2:]) == (1, 1)) \
            and tuple(up.flatten(1).shape) == (shape[0], r)
        if not fits:
            raise StudioError(f"{path.name}: {lora_name} has down {tuple(down.shape)} / up {tuple(up.shape)}, the "
                              f"model's layer is {shape}: it was made for another architecture")
        alpha = parts.get("alpha")
        scale = 1.0 if alpha is None else float(alpha) / r
        if not math.isfinite(scale) or not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise StudioError(f"{path.name}: {lora_name} holds NaN or infinite values")
        out[f"{name}.lora_A"] = down.contiguous()
        out[f"{name}.lora_B"] = (up if scale == 1.0 else up * scale).contiguous()
    return out


def exact_delta(base: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A delta d with (base + d) == target exactly in base's dtype where floats allow (as the concept edit
    adds it: fp32 sum, cast back); returns it and how many values stay inexact."""
    b, t = base.detach().float().cpu(), target.detach().float().cpu()
    d = t - b
    bad = torch.zeros_like(d, dtype=torch.bool)
    for _ in range(8):
        got = (b + d).to(base.dtype).float()
        bad = got != t
        if not bad.any():
            break
        d = torch.where(bad, torch.nextafter(d, torch.where(got < t, math.inf, -math.inf)), d)
    return d, int(bad.sum())


def _custom_diffusion_from(state: dict, path: Path, model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Concept tensors ({name}.delta = trained weight - the model's) of a Custom Diffusion file."""
    pipe, _ = _pipe_of(model)
    if pipe is None:
        raise StudioError(f"{path.name}: Custom Diffusion files hold full weights; importing needs the model they "
                          "were trained on (pipe=...) to turn them into changes")
    out, notes = {}, []
    for key, value in sorted(state.items()):
        if not torch.is_tensor(value) or not value.numel():
            continue  # an attention with default behaviour
        m = CD_KEY.match(key)
        if m is None:
            raise StudioError(f"{path.name}: unknown key {key!r} in a Custom Diffusion file")
        name = f"unet.{m.group(1)}.{CD_PARTS[m.group(2)]}"
        try:
            live = find_tensor(pipe, name)
        except StudioError:
            raise StudioError(f"{path.name} does not fit this model: it has no layer {name.removeprefix('unet.')} "
                              "(the file was made for another architecture)") from None
        if tuple(value.shape) != tuple(live.shape):
            raise StudioError(f"{path.name}: {key} has shape {tuple(value.shape)}, the model's {name} is "
                              f"{tuple(live.shape)}: it was made for another architecture")
        if not torch.isfinite(value).all():
            raise StudioError(f"{path.name}: {key} holds NaN or infinite values")
        delta, inexact = exact_delta(_base_value(model, name), value.to(live.dtype))
        if inexact:
            notes.append(f"{name}: {inexact} values cannot be reproduced exactly on this model's weights")
        if delta.any():
            out[f"{name}.delta"] = delta.contiguous()
    if not out:
        raise StudioError(f"{path.name}: its weights equal this model's: there is no change to import")
    return out, notes


def _expand(paths) -> list[Path]:
    items = [paths] if isinstance(paths, (str, Path)) else list(paths or [])
    files = []
    for p in map(Path, items):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in TENSOR_SUFFIXES + PICKLE_SUFFIXES)
            if not found:
                raise StudioError(f"{p} holds no .safetensors/.pt/.bin file to import")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise StudioError(f"{p}: no such file or folder")
    if not files:
        raise StudioError("no files to import: choose an embedding, a LoRA or a Custom Diffusion folder")
    return files


def import_concept(paths, token: str | None = None, pipe=None, strength: float = 1.0, scope: str = "prompt") -> Edit:
    """A "learned_concept" Edit (not applied) from embedding / kohya LoRA / Custom Diffusion files or
    folders; several files combine (e.g. an embedding and a LoRA). `token` names the concept (default:
    what the embedding file says, or its file name). `pipe` (a pipeline or PipelineManager) is needed
    for LoRA and Custom Diffusion files and checks every shape and the token against the model. `scope`:
    where the UNet changes act ("prompt": images whose prompt uses the token; without a token always)."""
    from .scope import check_scope

    scope = check_scope(scope)
    model = pipe
    pipe, _ = _pipe_of(model)
    files = _expand(paths)
    embedding, file_token, formats, notes, weights = None, None, [], [], {}
    for path in files:
        state, meta = read_file(path)
        fmt = detect_format(state)
        formats.append(fmt)
        if fmt == "embedding":
            if embedding is not None:
                raise StudioError(f"{path.name} is a second embedding: import one concept's token at a time")
            embedding, file_token = _embedding_from(state, meta, path)
            base = meta.get("studio_base_model")
            if base and pipe is not None and base != base_signature(pipe):
                notes.append(f"{path.name} was exported from another model (signature {base})")
            continue
        if fmt == "lora":  # A1111 LoRAs may bundle their trigger's embedding: bundle_emb.<name>.<key>
            bundled: dict[str, dict] = {}
            for key in [k for k in state if k.startswith("bundle_emb.")]:
                parts = key.split(".", 2)
                bundled.setdefault(parts[1], {})[parts[2] if len(parts) > 2 else ""] = state.pop(key)
            if len(bundled) > 1 or (bundled and embedding is not None):
                raise StudioError(f"{path.name} brings another embedding: import one concept's token at a time")
            if bundled:
                (emb_name, emb_state), = bundled.items()
                embedding, file_token = _embedding_from(emb_state, {}, path, default=emb_name)
                formats.append("embedding")
        new = _lora_from(state, path, pipe) if fmt == "lora" else None
        if fmt == "custom_diffusion":
            new, cd_notes = _custom_diffusion_from(state, path, model)
            notes += cd_notes
        names = {k.rsplit(".", 1)[0] for k in new}
        clash = names & {k.rsplit(".", 1)[0] for k in weights}
        if clash:
            raise StudioError(f"{path.name} changes {sorted(clash)[0]} again (another file already did): import "
                              "them as separate concepts")
        weights.update(new)
    if token is not None and embedding is None:
        raise StudioError(f"a token ({token}) was given but none of the files is an embedding")
    if embedding is not None:
        token = str(token or file_token or "").strip()
        if pipe is not None:
            token = check_token(pipe.tokenizer, token)
            width = pipe.text_encoder.get_input_embeddings().embedding_dim
            if embedding.shape[-1] != width:
                raise StudioError(f"the embedding has width {embedding.shape[-1]}, this text encoder's is {width}: it "
                                  "was made for another architecture")
        elif not TOKEN_PATTERN.match(token):
            raise StudioError(f"token {token!r} must be one word of at most 40 characters, without spaces or commas")
    modules = sorted({k.rsplit(".", 1)[0] for k in weights})
    params = {"method": "imported", "token": token if embedding is not None else None, "modules": modules,
              "strength": check_strength(strength), "name": file_stem(token) if embedding is not None else files[0].stem,
              "formats": sorted(set(formats)), "files": [p.name for p in files],
              "vectors": len(embedding) if embedding is not None else 0,
              "scope": scope if embedding is not None else "always"}
    if "custom_diffusion" in formats:
        params["base_model"] = base_signature(pipe)  # the changes are relative to this model's weights
    if notes:
        params["notes"] = notes
    tensors = dict(weights)
    if embedding is not None:
        tensors["embedding"] = embedding
    return Edit("learned_concept", params, tensors, label=concept_label(params))
