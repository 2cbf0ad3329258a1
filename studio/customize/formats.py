"""Learned concepts in the files other tools load, and back: A1111/ComfyUI embeddings, kohya LoRAs and
diffusers' Custom Diffusion folders; pickles are read only through `torch.load(weights_only=True)`."""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch

from .. import models
from ..checks import base_signature, check_base
from ..edit_files import read_tensors, save_tensors
from ..edits import Edit, find_tensor
from ..errors import StudioError
from ..loading import PICKLE_SUFFIXES
from ..lora_export import lora_from_changes, save_lora, skipped_text
from ..tokenizer import check_token
from ..training import concept_label
from .concept import MAX_VECTORS, check_strength, weight_delta
from .scope import check_scope

FORMATS = ("embedding", "lora", "custom_diffusion")
CD_WEIGHTS = "pytorch_custom_diffusion_weights.safetensors"  # diffusers' CUSTOM_DIFFUSION_WEIGHT_NAME_SAFE
EMBEDS = "learned_embeds.safetensors"  # diffusers' TEXT_INVERSION_NAME_SAFE
LORA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
LYCORIS_PARTS = ("hada_", "lokr_", "lora_mid", "dora_scale", "diff", "on_input", "w_norm", "b_norm")
KV = ("to_k.weight", "to_v.weight")


def _pipe_of(model):
    return (model.pipe, model) if hasattr(model, "stack") and hasattr(model, "lock") else (model, None)


def _base_value(model, name: str) -> torch.Tensor:
    """Weight `name` before any applied edit (with a bare pipeline: its current value)."""
    pipe, manager = _pipe_of(model)
    if manager is not None:
        with manager.lock:
            for entry in manager.stack.applied:
                if name in entry.patch.originals:
                    return entry.patch.originals[name].clone()
    return find_tensor(pipe, name).detach().to("cpu", copy=True)


def file_stem(token: str | None) -> str:
    """A file name for a token: '<my-cat>' -> 'my-cat'."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(token or "").strip("<>")).strip("-.") or "concept"


def _concept_parts(edit: Edit):
    if not isinstance(edit, Edit) or edit.kind != "learned_concept":
        raise StudioError(f"only learned concepts can be exported this way (got {getattr(edit, 'title', edit)!r})")
    return edit.params, edit.tensors, edit.params.get("token"), check_strength(edit.params.get("strength", 1.0))


def lora_state(edit: Edit, rank: int = 16, pipe=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Kohya-key LoRA of the concept's changes at its strength (full deltas factored at `rank`), and a report."""
    params, tensors, _, strength = _concept_parts(edit)
    factors, deltas = {}, {}
    cpu = lambda key: tensors[key].detach().float().cpu()  # noqa: E731
    for name in params.get("modules", []):
        if f"{name}.lora_A" in tensors:
            factors[name] = cpu(f"{name}.lora_A"), cpu(f"{name}.lora_B") * strength
        elif f"{name}.delta" in tensors:
            deltas[name] = torch.zeros_like(cpu(f"{name}.delta")), cpu(f"{name}.delta") * strength
        else:
            raise StudioError(f"this concept lacks the change of {name}: it is damaged; train or import it again")
    return lora_from_changes(deltas, rank, pipe, factors)


def custom_diffusion_state(edit: Edit, model) -> tuple[dict[str, torch.Tensor], dict]:
    """The concept's attention changes as diffusers' Custom Diffusion file: full weights per processor."""
    params, tensors, _, strength = _concept_parts(edit)
    pipe = _pipe_of(model)[0]
    if pipe is None:
        raise StudioError("Custom Diffusion files hold full weights: export them with the model (model=manager)")
    check_base(pipe, params, fix="load that model to export its Custom Diffusion weights")
    modules = list(params.get("modules", []))
    processors = models.of(pipe).custom_diffusion_keys()
    other = [n for n in modules if n not in {n for keys in processors.values() for n in keys.values()}]
    if other:
        raise StudioError(f"Custom Diffusion files carry only attention projections, not {other[0]}: export a LoRA")
    if not modules:
        raise StudioError("this concept changes no weights: export its embedding instead")
    state, written, layers = {}, [], 0
    for proc, keys in processors.items():
        touched = [n for n in keys.values() if n in modules]
        if not touched:
            state[proc] = torch.zeros(0)  # every attention needs an entry; safetensors cannot store {}
            continue
        layers += 1
        q_out = any(not n.endswith(KV) for n in touched)  # k, v go together (shapes from to_k); so do q, out
        for key, name in keys.items():
            if q_out or name.endswith(KV):
                base = _base_value(model, name)
                delta = weight_delta(tensors, name, base.shape) if name in modules else None
                state[key] = base if delta is None else (base.float() + strength * delta).to(base.dtype)
                written.append(name)
    return state, {"modules": written, "attention_layers": layers}


def export_concept(edit: Edit, folder, formats=FORMATS, rank: int = 16, model=None) -> dict:
    """Write the concept in `formats` into `folder` (Custom Diffusion needs `model`); written, errors, notes."""
    params, tensors, token, strength = _concept_parts(edit)
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise StudioError(f"unknown export format {', '.join(map(repr, unknown)) or 'none'}: choose from {FORMATS}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"{folder} is a file: choose a folder to export into")
    stem = file_stem(token or params.get("name"))
    meta = {"studio_token": token or "", "studio_vectors": len(tensors.get("embedding", ())) if token else 0,
            "studio_base_model": params.get("base_model") or "", "studio_method": params.get("method", "")}
    out = {"written": {}, "errors": {}, "notes": [], "lora": None, "custom_diffusion": None}
    notes = out["notes"]
    if strength != 1.0:
        notes.append(f"the weight changes are written at the concept's strength {strength:g}")
    for fmt in formats:
        try:
            if fmt == "embedding":
                if token is None or "embedding" not in tensors:
                    raise StudioError("this concept has no token: there is no embedding to export")
                emb = {"emb_params": tensors["embedding"].detach().float()}
                paths = [save_tensors(emb, folder / f"{stem}.safetensors", {**meta, "format": "pt"})]
                notes.append(f"embedding: A1111/ComfyUI call it '{stem}'; diffusers: "
                             f"pipe.load_textual_inversion('{paths[0]}', token='{token}')")
            elif fmt == "lora":
                state, report = lora_state(edit, rank, _pipe_of(model)[0])
                if not state:
                    why = skipped_text(report) or "a token-only concept: export its embedding"
                    raise StudioError(f"this concept changes no weight a LoRA can carry ({why})")
                paths = [save_lora(state, report, folder / f"{stem}-lora.safetensors", rank, meta)]
                out["lora"] = report
                if any(m["source"] == "svd" for m in report["modules"].values()):
                    notes.append(f"lora: full changes factored at rank {rank}, relative error "
                                 f"{report['error']:.3g} (largest per layer {report['max_error']:.3g})")
                if report["skipped"]:
                    notes.append(f"lora: {len(report['skipped'])} changes not in the LoRA: {skipped_text(report)}")
                if token:
                    notes.append(f"lora: the token {token} is not in the LoRA; load the embedding with it")
            else:
                state, report = custom_diffusion_state(edit, model)
                sub = folder / f"{stem}-custom-diffusion"
                paths = [save_tensors(state, sub / CD_WEIGHTS, {"format": "pt", **meta})]
                if token:
                    emb = {token: tensors["embedding"].float().squeeze(0)}  # one vector: 1-D, as diffusers writes
                    paths.append(save_tensors(emb, sub / EMBEDS, {"format": "pt"}))
                out["custom_diffusion"] = {**report, "folder": str(sub)}
                notes.append(f"custom_diffusion: diffusers: pipe.load_textual_inversion('{sub}'); "
                             f"pipe.unet.load_attn_procs('{sub}', weight_name='{CD_WEIGHTS}', _pipeline=pipe)")
            out["written"][fmt] = [str(p) for p in paths]
        except StudioError as exc:
            out["errors"][fmt] = str(exc)
    return out


def _flatten(obj, prefix: str = "") -> dict:
    """Nested dicts of a torch.load result as 'a.b' keys."""
    if not isinstance(obj, dict) or not obj:
        return {prefix.rstrip("."): obj}
    return {k: v for key, value in obj.items() for k, v in _flatten(value, f"{prefix}{key}.").items()}


def read_file(path: Path) -> tuple[dict, dict]:
    """(values by key, metadata) of a safetensors file, or of a pickle that `weights_only` loading reads."""
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise StudioError(f"{path.name} is empty (0 bytes)")
    if suffix == ".safetensors":
        state, meta = read_tensors(path)
    elif suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            needs = re.search(r"GLOBAL ([\w.]+)", str(exc))
            raise StudioError(f"{path.name}: pickle checkpoint: convert it to safetensors (it holds "
                              f"{needs.group(1) if needs else 'Python objects'}; unpickling can run code)") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise StudioError(f"{path.name} is not a readable PyTorch file: {exc}") from None
        obj = {"": obj} if torch.is_tensor(obj) else obj
        if not isinstance(obj, dict):
            raise StudioError(f"{path.name} holds a {type(obj).__name__}, not tensors by name")
        state, meta = _flatten(obj), {}
    else:
        raise StudioError(f"{path.name}: unsupported file type {suffix or '(none)'}; use .safetensors or .pt/.bin")
    if not any(torch.is_tensor(v) and v.numel() for v in state.values()):
        raise StudioError(f"{path.name} is empty: it holds no tensors")
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise StudioError(f"{path.name}: {bad[0]} holds NaN or infinite values")
    return state, meta


def detect_format(state: dict) -> str:
    """'embedding', 'lora' (kohya keys) or 'custom_diffusion'."""
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
        raise StudioError("this is a diffusers/peft-format LoRA: load it with load_lora_weights, or make it kohya")
    raise StudioError(f"unknown file contents ({', '.join(keys[:4])}): not an embedding, LoRA or Custom Diffusion")


def _embedding_from(state: dict, meta: dict, path: Path, default: str | None = None) -> tuple[torch.Tensor, str]:
    """(vectors [n, d], the token the file names) of an embedding file."""
    default = default or path.stem
    if "emb_params" in state:
        vec, name = state["emb_params"], meta.get("studio_token") or default
    elif "string_to_param.*" in state:
        vec = state["string_to_param.*"]
        name = state["name"] if isinstance(state.get("name"), str) and state["name"] else default
    else:
        key = next(k for k, v in state.items() if torch.is_tensor(v) and v.numel())
        vec, name = state[key], key or default
    if not torch.is_tensor(vec) or vec.dim() not in (1, 2) or not vec.numel():
        raise StudioError(f"{path.name}: the embedding's shape is {tuple(getattr(vec, 'shape', ()))}, not [vectors, d]")
    vec = vec.detach().float().reshape(-1, vec.shape[-1]).contiguous()
    if len(vec) > MAX_VECTORS:
        raise StudioError(f"{path.name}: {len(vec)} vectors; at most {MAX_VECTORS} are supported")
    return vec, name


def _lora_from(state: dict, path: Path, pipe) -> dict[str, torch.Tensor]:
    """Concept tensors ({name}.lora_A/B, scale alpha/rank folded into B) of a kohya LoRA."""
    bad = sorted({k.split(".", 1)[1] for k in state if "." in k and k.split(".", 1)[1].startswith(LYCORIS_PARTS)})
    if bad:
        raise StudioError(f"{path.name} is a LyCORIS/DoRA network ({', '.join(bad[:3])}): import a plain LoRA")
    family = models.of(pipe)
    groups: dict[str, dict] = {}
    for key, value in family.lora_from_file(state, path.name).items():
        lora_name, _, part = key.partition(".")
        if part not in LORA_PARTS or not lora_name.startswith(tuple(family.lora_prefixes.values())):
            raise StudioError(f"{path.name}: unknown key {key!r} (a kohya LoRA has lora_down, lora_up and alpha)")
        groups.setdefault(lora_name, {})[part] = value
    names = family.lora_weights()
    missing = [k for k in groups if k not in names]
    if missing:
        raise StudioError(f"{path.name} does not fit this model: layers not in it, e.g. {missing[0]}")
    out = {}
    for lora_name, parts in sorted(groups.items()):
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise StudioError(f"{path.name}: {lora_name} lacks lora_down or lora_up: the file is damaged")
        down, up = parts["lora_down.weight"].detach().float(), parts["lora_up.weight"].detach().float()
        name, r = names[lora_name], len(down)
        shape = tuple(find_tensor(pipe, name).shape)
        kernel = shape[1:] if len(shape) == 4 else (shape[1], 1, 1)  # down: flat, or a conv of the layer's kernel
        if tuple(down.shape) not in ((r, math.prod(kernel)), (r, *kernel)) \
                or tuple(up.shape) not in ((shape[0], r), (shape[0], r, 1, 1)):  # up: flat or a 1x1 conv
            raise StudioError(f"{path.name}: {lora_name} does not fit the layer {shape}: made for another architecture")
        scale = float(parts.get("alpha", r)) / r  # values are finite: read_file checked them
        out[f"{name}.lora_A"] = down.contiguous()
        out[f"{name}.lora_B"] = (up if scale == 1.0 else up * scale).contiguous()
    return out


def exact_delta(base: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """d with (base + d) == target in base's dtype (fp32 sum, cast back) where floats allow; and the misses."""
    b, t = base.detach().float().cpu(), target.detach().float().cpu()
    d = t - b
    for _ in range(8):
        got = (b + d).to(base.dtype).float()
        bad = got != t
        if not bad.any():
            break
        d = torch.where(bad, torch.nextafter(d, torch.where(got < t, math.inf, -math.inf)), d)
    return d, int(bad.sum())


def _custom_diffusion_from(state: dict, path: Path, model) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Concept tensors ({name}.delta = trained weight - the model's) of a Custom Diffusion file."""
    pipe = _pipe_of(model)[0]
    names = {k: n for keys in models.of(pipe).custom_diffusion_keys().values() for k, n in keys.items()}
    out, notes = {}, []
    for key, value in sorted(state.items()):
        if not torch.is_tensor(value) or not value.numel():
            continue  # an attention with default behaviour
        if key not in names:
            raise StudioError(f"{path.name} does not fit this model (another architecture?): no weight {key!r}")
        name = names[key]
        live = find_tensor(pipe, name)
        if tuple(value.shape) != tuple(live.shape):
            raise StudioError(f"{path.name}: {key} does not fit {tuple(live.shape)}: made for another architecture")
        delta, inexact = exact_delta(_base_value(model, name), value.to(live.dtype))
        if inexact:
            notes.append(f"{name}: {inexact} values cannot be reproduced exactly on this model's weights")
        if delta.any():
            out[f"{name}.delta"] = delta.contiguous()
    if not out:
        raise StudioError(f"{path.name}: its weights equal this model's: nothing to import")
    return out, notes


def _expand(paths) -> list[Path]:
    files, suffixes = [], (".safetensors", *PICKLE_SUFFIXES)
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else list(paths or [])):
        if not p.is_file() and not p.is_dir():
            raise StudioError(f"{p}: no such file or folder")
        found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in suffixes) if p.is_dir() else [p]
        if not found:
            raise StudioError(f"{p} holds no .safetensors/.pt/.bin file to import")
        files += found
    if not files:
        raise StudioError("no files to import: choose an embedding, a LoRA or a Custom Diffusion folder")
    return files


def import_concept(paths, token: str | None = None, pipe=None, strength: float = 1.0, scope: str = "prompt") -> Edit:
    """A "learned_concept" Edit from files or folders; weights need `pipe` (pipeline or manager) to check them."""
    scope, model, files = check_scope(scope), pipe, _expand(paths)
    pipe = _pipe_of(model)[0]
    embeddings, formats, notes, weights = [], [], [], {}  # embeddings: (vectors, the token a file names)
    for path in files:
        state, meta = read_file(path)
        formats.append(detect_format(state))
        if formats[-1] == "embedding":
            embeddings.append(_embedding_from(state, meta, path))
            base = meta.get("studio_base_model")
            if base and pipe is not None and base != base_signature(pipe):
                notes.append(f"{path.name} was exported from another model (signature {base})")
            continue
        if pipe is None:
            raise StudioError(f"{path.name}: importing {formats[-1]} weights needs the model they are for (pipe=...)")
        if formats[-1] == "custom_diffusion":
            new, cd_notes = _custom_diffusion_from(state, path, model)
            notes += cd_notes
        else:  # a LoRA; A1111's may bundle their trigger's embedding: bundle_emb.<name>.<key>
            bundled: dict[str, dict] = {}
            for key in [k for k in state if k.startswith("bundle_emb.")]:
                parts = key.split(".", 2)
                bundled.setdefault(parts[1], {})[parts[2] if len(parts) > 2 else ""] = state.pop(key)
            embeddings += [_embedding_from(s, {}, path, default=name) for name, s in bundled.items()]
            formats += ["embedding"] if bundled else []
            new = _lora_from(state, path, pipe)
        clash = {k.rsplit(".", 1)[0] for k in new} & {k.rsplit(".", 1)[0] for k in weights}
        if clash:
            raise StudioError(f"{path.name} changes {sorted(clash)[0]} again: import the files as separate concepts")
        weights.update(new)
    if len(embeddings) > 1:
        raise StudioError("the files bring more than one embedding: import one at a time")
    if token is not None and not embeddings:
        raise StudioError(f"a token ({token}) was given but none of the files is an embedding")
    if embeddings:
        (embedding, file_token), = embeddings
        family = models.of(pipe) if pipe is not None else None
        token = check_token(family.tokenizers[0] if family else None, token or file_token)
        width = family.token_tables()[0].embedding_dim if family else embedding.shape[-1]
        if embedding.shape[-1] != width:
            raise StudioError(f"the embedding has width {embedding.shape[-1]}, not {width}: made for another model")
        weights["embedding"] = embedding
    modules = sorted({k.rsplit(".", 1)[0] for k in weights if k != "embedding"})
    params = {"method": "imported", "token": token, "modules": modules,  # no embedding: token is None
              "strength": check_strength(strength), "name": file_stem(token) if embeddings else files[0].stem,
              "formats": sorted(set(formats)), "files": [p.name for p in files],
              "vectors": len(weights["embedding"]) if embeddings else 0, "scope": scope if embeddings else "always"}
    if "custom_diffusion" in formats:
        params["base_model"] = base_signature(pipe)  # the changes are relative to this model's weights
    if notes:
        params["notes"] = notes
    return Edit("learned_concept", params, weights, label=concept_label(params))
