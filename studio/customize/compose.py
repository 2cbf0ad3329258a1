"""Several learned concepts in one image, each way one Edit: Custom Diffusion's closed-form K/V merge, weighted
unfused peft adapters, region-aware attention (Concept Conductor; applied in collage.py) and T2I-Zero's steering."""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import models, steering
from ..capture import STANDARD_PROCESSORS, attention_probs, gaussian_smooth, grid_shape, project_qk
from ..checks import base_signature, check_base, known, number, whole
from ..edits import EDIT_KINDS, Edit, edit_kind, find_tensor, module_slot
from ..errors import StudioError
from ..fingerprint import edit_digest
from ..tokenizer import prompt_ids, token_names
from .concept import check_strength, weight_delta
from .scope import PromptWords
from .train import DEFAULT_TEMPLATES, fill

NEG = -1e4  # additive attention bias that removes a key (exp(-1e4) == 0) and stays finite in fp16
REG_TEMPLATES = ("a photo of a {}", "a painting of a {}", "a {} in the street", "a close-up of a {}",
                 "a {} on a table", "a drawing of a {}", "a {} at night", "a black and white photo of a {}",
                 "a {} in the snow", "a small {}")
REG_WORDS = ("dog", "cat", "car", "house", "tree", "person", "bird", "flower", "chair", "bicycle", "boat", "mountain",
             "city", "horse", "cup", "book", "child", "river", "lamp", "train")
REG_PROMPTS = tuple(t.format(w) for t in REG_TEMPLATES for w in REG_WORDS)
RIDGE = 1e-6  # the merge's ridge, relative to the mean eigenvalue


def check_concepts(concepts, least: int, need_token: bool = False) -> list[Edit]:
    """Learned-concept edits with distinct tokens, at least `least` of them; StudioError otherwise."""
    concepts = list(concepts or [])
    if len(concepts) < least:
        raise StudioError(f"composing needs at least {least} learned concept(s) (got {len(concepts)})")
    tokens = set()
    for c in concepts:
        if not isinstance(c, Edit) or c.kind != "learned_concept":
            what = f"{c.title!r} (kind {c.kind!r})" if isinstance(c, Edit) else type(c).__name__
            raise StudioError(f"{what} is not a learned concept: only those can be composed")
        token = c.params.get("token")
        if token is None and need_token:
            raise StudioError(f"{c.title!r} has no token, which the merge needs: compose it as an adapter instead")
        if token is not None:
            if token in tokens:
                raise StudioError(f"two concepts use the token {token!r}: train one again under another token")
            tokens.add(token)
            if getattr(c.tensors.get("embedding"), "ndim", 0) != 2:
                raise StudioError(f"{c.title!r} has no valid embedding: it is damaged; train or import it again")
    return concepts


@torch.no_grad()
def reg_gram(pipe, prompts: list[str]) -> torch.Tensor:
    """Σ c cᵀ over every position but SOS of every caption (what the UNet's K/V see): d x d, float64."""
    gram = 0
    for i in range(0, len(prompts), 50):
        x = models.of(pipe).encode(prompts[i:i + 50]).embeds[:, 1:].flatten(0, 1).double().cpu()
        gram = gram + x.T @ x
    return gram


@torch.no_grad()
def token_features(pipe, concept: Edit, templates) -> torch.Tensor:
    """(m, d): text-encoder outputs at the concept's token positions in `templates`, the concept applied."""
    with steering.temporary(pipe) as patch:
        EDIT_KINDS["learned_concept"](pipe, dict(concept.params), dict(concept.tensors), patch)
        token = concept.params["token"]
        ids = set(pipe.tokenizer.convert_tokens_to_ids(token_names(token, len(concept.tensors["embedding"]))))
        prompts = [models.of(pipe).spelled(fill(t, token)) for t in templates]
        emb = models.of(pipe).encode(prompts).embeds.float()
        rows = [emb[i, j] for i, p in enumerate(prompts)
                for j, t in enumerate(prompt_ids(pipe.tokenizer, p)) if t in ids]
        return torch.stack(rows).double().cpu()


def merge_map(targets: torch.Tensor, gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """T with each layer's merged ΔW = R·T (R = V_tgt − W₀·C_tgt): min tr(ΔW A ΔWᵀ) s.t. ΔW·Cᵀ = R, A = C_regᵀC_reg,
    gives R (C A⁻¹ Cᵀ)⁻¹ C A⁻¹; both inverses are ridged so near-duplicate targets stay stable."""
    def ridged(m):
        return m + ridge * m.trace() / len(m) * torch.eye(len(m), dtype=torch.float64)

    a_inv_ct = torch.linalg.solve(ridged(gram), targets.T)  # A⁻¹ Cᵀ: d x m
    return torch.linalg.solve(ridged(targets @ a_inv_ct), a_inv_ct.T)


def merge_edit(pipe, concepts: list[Edit], reg_prompts: list[str] | None = None) -> Edit:
    """Merge concepts' K/V changes in closed form, keeping `reg_prompts`' outputs (call with the lock held)."""
    concepts = check_concepts(concepts, 2, need_token=True)  # token_features refuses a concept of another model
    reg_prompts = [str(p) for p in (REG_PROMPTS if reg_prompts is None else reg_prompts) if str(p).strip()]
    if len(reg_prompts) < 10:
        raise StudioError(f"the merge needs ordinary captions to keep (about 200; got {len(reg_prompts)})")
    kv = sorted(models.of(pipe).text_projections())
    if not kv:
        raise StudioError("this UNet has no plain cross-attention K/V layers: undo any installed adapters")

    features = [token_features(pipe, c, DEFAULT_TEMPLATES) for c in concepts]
    targets, gram = torch.cat(features), reg_gram(pipe, reg_prompts)
    T = merge_map(targets, gram, RIDGE)
    strengths = [check_strength(c.params.get("strength", 1.0)) for c in concepts]
    tensors, errors, reg = {}, [0.0] * len(concepts), {"merged": 0.0, "summed": 0.0, "base": 0.0}
    for name in kv:
        w0 = find_tensor(pipe, name).detach().double().cpu()
        deltas = [weight_delta(c.tensors, name, w0.shape) for c in concepts]
        deltas = [None if d is None else s * d.double() for d, s in zip(deltas, strengths)]
        if all(d is None for d in deltas):
            continue
        parts = [w0.new_zeros(len(w0), len(f)) if d is None else d @ f.T for d, f in zip(deltas, features)]
        merged = torch.cat(parts, 1) @ T
        tensors[f"{name}.delta"] = merged.float()
        at_targets = (merged @ targets.T).split([len(f) for f in features], 1)
        for i, (got, want, f) in enumerate(zip(at_targets, parts, features)):  # ‖W·C − V‖ / ‖V‖
            errors[i] = max(errors[i], float((got - want).norm() / (w0 @ f.T + want).norm()))
        summed = sum(d for d in deltas if d is not None)
        for key, m in (("merged", merged), ("summed", summed), ("base", w0)):
            reg[key] += float(((m @ gram) * m).sum())
    owners: dict[str, list[str]] = {}  # changes outside K/V, summed
    for c, s in zip(concepts, strengths):
        for name in [n for n in c.params.get("modules", []) if n not in kv]:
            delta = s * weight_delta(c.tensors, name, find_tensor(pipe, name).shape).float()
            tensors[f"{name}.delta"] = tensors.get(f"{name}.delta", 0) + delta
            owners.setdefault(c.params["token"], []).append(name)
    tokens = [c.params["token"] for c in concepts]
    tensors.update({f"embedding.{i}": c.tensors["embedding"].float().cpu() for i, c in enumerate(concepts)})
    notes = [f"{t}: textual inversion only (its token joins; its K/V outputs are kept as they are)"
             for t, c in zip(tokens, concepts) if not any(n in kv for n in c.params.get("modules", []))]
    if owners:
        count = len({n for names in owners.values() for n in names})
        notes.append(f"{count} weight change(s) outside cross-attention K/V were summed, not merged "
                     f"({'; '.join(f'{t}: {len(n)}' for t, n in owners.items())}): shared layers may interfere")
    ratio = lambda key: round(math.sqrt(reg[key] / reg["base"]), 6) if reg["base"] else 0.0  # noqa: E731
    params = dict(tokens=tokens, concepts=[c.title for c in concepts], modules=sorted(n.removesuffix(".delta")
                  for n in tensors if n.endswith(".delta")), base_model=base_signature(pipe),
                  reg_prompts=len(reg_prompts), templates=list(DEFAULT_TEMPLATES), ridge=RIDGE, notes=notes,
                  constraint_error={t: round(e, 6) for t, e in zip(tokens, errors)},
                  reg_change=ratio("merged"), reg_change_if_summed=ratio("summed"))
    return Edit("compose_merge", params, tensors, label=f"merge {' + '.join(tokens)} (closed form)")


@edit_kind("compose_merge")
def apply_merge(pipe, params: dict, tensors: dict, patch) -> None:
    check_base(pipe, params, "this merge was computed", "load that model, or merge the concepts again here")
    for name in params.get("modules", []):
        w, delta = patch.read(name), tensors.get(f"{name}.delta")
        if delta is None or delta.numel() != w.numel():
            raise StudioError(f"this merge lacks a valid change of {name}: it is damaged; merge the concepts again")
        patch.write(name, w.float() + delta.to(w.device).reshape(w.shape))
    for i, token in enumerate(params.get("tokens", [])):
        models.of(pipe).install_tokens(token, tensors[f"embedding.{i}"], patch)


def lora_factors(tensors: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a concept's change of `name`; a full delta becomes exact full-rank SVD factors (B = U·S, A = Vᴴ)."""
    if f"{name}.lora_A" in tensors:
        return tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
    delta = tensors.get(f"{name}.delta")
    if delta is None:
        raise StudioError(f"a concept lacks the change of {name}: it is damaged; train or import it again")
    u, s, vh = torch.linalg.svd(delta.double().flatten(1), full_matrices=False)
    a, b = vh.float(), (u * s).float()
    if delta.dim() == 4:  # conv: A is a conv with the kernel, B a 1x1 conv
        a, b = a.reshape(len(a), *delta.shape[1:]), b[:, :, None, None]
    return a.contiguous(), b.contiguous()


def adapters_edit(concepts: list[Edit], weights: list[float] | None = None) -> Edit:
    """Every concept as its own unfused peft LoRA adapter at `weights` (default 1 each), all active."""
    concepts = check_concepts(concepts, 1)
    weights = [1.0] * len(concepts) if weights is None else list(weights)
    if len(weights) != len(concepts):
        raise StudioError(f"give one weight per concept ({len(concepts)} concepts, {len(weights)} weights)")
    entries, tensors = [], {}
    for i, (c, w) in enumerate(zip(concepts, weights)):
        p = c.params
        entries.append(dict(token=p.get("token"), label=c.title, modules=list(p.get("modules", [])),
                            base_model=p.get("base_model"), strength=check_strength(p.get("strength", 1.0)),
                            weight=number(f"the weight of {c.title!r}", w, -10, 10)))
        for name in entries[-1]["modules"]:
            tensors[f"{i}/{name}.lora_A"], tensors[f"{i}/{name}.lora_B"] = lora_factors(c.tensors, name)
        if p.get("token") is not None:
            tensors[f"{i}/embedding"] = c.tensors["embedding"].float().cpu()
    label = "adapters " + ", ".join(f"{e['token'] or e['label']} x{e['weight']:g}" for e in entries)
    return Edit("compose_adapters", dict(concepts=entries), tensors, label=label)


@edit_kind("compose_adapters")
def apply_adapters(pipe, params: dict, tensors: dict, patch) -> None:
    from peft import LoraConfig
    from peft.tuners.lora import Conv2d as LoraConv2d, Linear as LoraLinear
    from peft.tuners.tuners_utils import BaseTunerLayer

    entries = params.get("concepts") or []
    if not entries:
        raise StudioError("this adapter composition has no concepts")
    layers: dict[str, tuple] = {}  # weight name -> (peft layer, parent, attribute)
    for i, e in enumerate(entries):
        check_base(pipe, e)
        adapter = f"concept_{i}"
        scale = number("adapter weight", e.get("weight", 1.0), -10, 10) * check_strength(e.get("strength", 1.0))
        for name in e.get("modules", []):
            a, b = tensors.get(f"{i}/{name}.lora_A"), tensors.get(f"{i}/{name}.lora_B")
            if a is None or b is None:
                raise StudioError(f"this composition lacks the factors of {name}: it is damaged; compose again")
            config = LoraConfig(r=len(a), lora_alpha=len(a), init_lora_weights=False, inference_mode=True)
            if name in layers:
                layer = layers[name][0]
                layer.update_layer(adapter, len(a), lora_alpha=len(a), config=config)
            else:
                parent, attr, base = module_slot(pipe, name)
                if isinstance(base, BaseTunerLayer):
                    raise StudioError(f"{name} already carries peft adapters: undo that composition first")
                kind = (LoraLinear if isinstance(base, nn.Linear) else
                        LoraConv2d if isinstance(base, nn.Conv2d) else None)
                if kind is None:
                    raise StudioError(f"{name} is a {type(base).__name__}: adapters ride on linear and conv layers")
                layer = kind(base, adapter, config=config, r=len(a), lora_alpha=len(a))
                layers[name] = (layer, parent, attr)
            for mod, value in ((layer.lora_A[adapter], a), (layer.lora_B[adapter], b)):
                if tuple(mod.weight.shape) != tuple(value.shape):
                    raise StudioError(f"{name}: factors of shape {tuple(value.shape)} do not fit "
                                      f"{tuple(mod.weight.shape)}: learned on another architecture")
                with torch.no_grad():
                    mod.weight.copy_(value)
            layer.set_scale(adapter, scale)  # peft's per-adapter scaling: alpha / r (= 1) times the weight
    for layer, parent, attr in layers.values():
        layer.set_adapter(list(layer.lora_A.keys()), inference_mode=True)  # all active at once
        patch.set_attr(parent, attr, layer)
    for i, e in enumerate(entries):
        if e.get("token") is not None:
            models.of(pipe).install_tokens(e["token"], tensors[f"{i}/embedding"], patch)


class Steering(PromptWords):
    """A bias `bias(attn, q, k, hw)` -> (rows, N, T) on conditional cross-attention for the first `until` passes."""

    def __init__(self, pipe, words: list[str], until: float, signature: str):
        super().__init__(pipe, words, signature)
        self.until, self.first_site = until, None

    def tick(self, batch: int) -> None:
        """Called by the first cross-attention layer: counts UNet passes."""
        if self.positions is not None and batch == len(self.positions) * (2 if self.cfg else 1):
            self.passes += 1

    def rows(self, batch: int) -> slice | None:
        """The conditional rows of a UNet batch, or None when this pass is not steered."""
        if self.positions is None:
            return None
        total = getattr(self.pipe, "_num_timesteps", None)
        if self.until < 1 and total and self.passes - 1 >= self.until * total:
            return None
        n = len(self.positions)
        return slice(n, None) if self.cfg and batch == 2 * n else slice(None) if batch == n else None

    def install(self, patch, name: str) -> None:
        sites = models.of(self.pipe).attention_sites(cross=True)
        if not sites:
            raise StudioError("this UNet has no cross-attention layers to steer")
        self.first_site = next(iter(sites))
        steering.install(patch, self.pipe, "attention", name, self, sites)

    def wrap(self, site: str, attn, processor):
        clock = site == self.first_site
        if isinstance(processor, SteeredAttention):
            return SteeredAttention(processor.base, processor.steerings + [self], clock)
        if type(processor).__name__ in STANDARD_PROCESSORS:
            return SteeredAttention(processor, [self], clock)
        raise StudioError(f"{site} is a {type(processor).__name__} (another edit's): undo that edit first")


class SteeredAttention:
    """attn2 processor: SDPA with the sum of its steerings' biases as the mask; unsteered passes go to `base`."""

    def __init__(self, base, steerings: list[Steering], clock: bool):
        self.base, self.steerings, self.clock = base, steerings, clock

    def fingerprint(self) -> str:
        return f"SteeredAttention[{','.join(s.signature for s in self.steerings)}]"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        b = hidden_states.shape[0]
        if self.clock:
            for s in self.steerings:
                s.tick(b)
        plain = (encoder_hidden_states is not None and hidden_states.ndim == 3 and attention_mask is None
                 and attn.group_norm is None and attn.spatial_norm is None)
        live = [(s, r) for s in self.steerings if plain and (r := s.rows(b)) is not None]
        if not live:
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        q, k = project_qk(attn, hidden_states, encoder_hidden_states)
        bias = q.new_zeros(b, q.shape[2], k.shape[2], dtype=torch.float32)
        for s, rows in live:
            bias[rows] += s.bias(attn, q[rows], k[rows], grid_shape(q.shape[2], s.latent_hw))
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        v = attn.to_v(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None].to(q.dtype), dropout_p=0.0)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def region_edit(regions: list[tuple[str, object]], *, until: float = 0.5, collage: float = 0.0) -> Edit:
    """Each (words, box or mask): the words are attended only inside it; `collage` > 0: compose by collage."""
    if not isinstance(regions, (list, tuple)):
        raise StudioError("regions are a list of (words, box or mask) pairs")
    specs, tensors = [], {}
    for i, item in enumerate(regions):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise StudioError(f"region {i + 1} must be a (words, box or mask) pair (got {item!r:.80})")
        words, region = item
        try:
            arr = np.asarray(region.detach().cpu() if torch.is_tensor(region) else region, dtype=np.float64)
        except (TypeError, ValueError):
            raise StudioError(f"region {i + 1} ({words!r}): give a box (x0, y0, x1, y1) or a 2-D mask") from None
        if arr.ndim == 1:
            specs.append(dict(words=words, box=[float(v) for v in arr]))
            continue
        mask = torch.from_numpy(arr.astype(np.float32))
        if mask.dim() == 2 and mask.numel() and torch.isfinite(mask).all() and mask.max() > 1:
            mask = mask / mask.max()  # 0..255 masks
        specs.append(dict(words=words, mask=f"mask.{i}"))
        tensors[f"mask.{i}"] = mask
    params = dict(regions=specs, until=until, **({"collage": collage} if collage else {}))
    check_regions(params, tensors)
    how = (f", collage redrawn {collage:.0%}" if collage else "" if until >= 1 else f", first {until:.0%} of steps")
    return Edit("compose_regions", params, tensors,
                label=f"regions {', '.join(repr(s['words']) for s in specs)}{how}")


def check_regions(params: dict, tensors: dict) -> None:
    known(params, ("regions", "until", "collage"), "region")
    specs = params.get("regions")
    if not specs:
        raise StudioError("draw at least one region and say which words of the prompt belong in it")
    seen = set()
    for i, s in enumerate(specs):
        words = s.get("words")
        if not isinstance(words, str) or not words.strip():
            raise StudioError(f"region {i + 1}: say which words of the prompt go in it (e.g. 'red circle')")
        if words.strip() in seen:
            raise StudioError(f"the words {words!r} have two regions: draw one mask for several areas")
        seen.add(words.strip())
        if "box" in s:
            box = s["box"]
            ok = len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
            if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise StudioError(f"region {i + 1} ({words!r}): a box is (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 "
                                  f"and 0 <= y0 < y1 <= 1 (got {box!r})")
        else:
            mask = tensors.get(s.get("mask", ""))
            if mask is None or mask.dim() != 2 or not mask.numel():
                raise StudioError(f"region {i + 1} ({words!r}): a mask must be a 2-D array (got shape "
                                  f"{None if mask is None else tuple(mask.shape)})")
            if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() <= 0:
                raise StudioError(f"region {i + 1} ({words!r}): the mask is empty or invalid: paint where the words go")
    number("the fraction of steps to steer", params.get("until", 1.0), 1e-9, 1)
    number("the collage's share of steps to redraw", params.get("collage", 0.0), 0, 1)


def region_grid(spec: dict, tensors: dict, hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: the region at an attention resolution; never empty (a tiny region keeps its best cell)."""
    h, w = hw
    if "box" in spec:
        x0, y0, x1, y1 = spec["box"]
        ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
        soft = (((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None]).float()
        if not soft.any():
            soft[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = 1
    else:
        mask = tensors[spec["mask"]][None, None].float()
        soft = F.interpolate(mask, size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    inside = soft >= 0.5
    return inside if inside.any() else soft >= soft.max()


class RegionSteering(Steering):
    """A region's tokens can be attended only by query pixels inside it."""

    def __init__(self, pipe, params: dict, tensors: dict):
        specs = params["regions"]
        super().__init__(pipe, [s["words"].strip() for s in specs], params.get("until", 1.0),
                         edit_digest(params, tensors))
        self.specs, self.tensors, self.grids = specs, tensors, {}

    def bias(self, attn, q, k, hw):
        if hw not in self.grids:
            self.grids[hw] = torch.stack([region_grid(s, self.tensors, hw).flatten() for s in self.specs])
        inside = self.grids[hw].to(q.device)
        out = torch.zeros(q.shape[0], q.shape[2], k.shape[2], device=q.device)
        for r, groups in enumerate(self.positions):
            for j, pos in enumerate(groups):
                pos = [p for p in pos if p < out.shape[-1]]
                if pos:
                    out[r][:, pos] = torch.where(inside[j, :, None], 0.0, NEG)
        return out


T2I_ZERO_DEFAULTS = dict(correction=True, top_k=3, temperature=0.1, nms=True, suppress=0.0, smooth=[3, 0.5], until=1.0)


def t2i_zero_edit(words: list[str], **options) -> Edit:
    """Multi-Concept T2I-Zero for the concept `words`: `correction` and/or `nms` (defaults: not the paper's)."""
    words = [words] if isinstance(words, str) else list(words or [])
    params = {**T2I_ZERO_DEFAULTS, **options, "words": words}
    check_t2i_zero(params)
    parts = [n for n, on in (("correction", params["correction"]), ("NMS", params["nms"])) if on]
    return Edit("compose_t2i_zero", params, label=f"T2I-Zero {', '.join(map(repr, words))} ({' + '.join(parts)})")


def check_t2i_zero(p: dict) -> dict:
    known(p, [*T2I_ZERO_DEFAULTS, "words"], "T2I-Zero")
    p = {**T2I_ZERO_DEFAULTS, **p}
    words = [w.strip() for w in p.get("words") or [] if isinstance(w, str) and w.strip()]
    if len(words) < 2 or len(words) != len(p["words"]):
        raise StudioError("T2I-Zero needs at least two concept words of the prompt, none of them empty")
    if len(set(words)) != len(words):
        raise StudioError("each concept word once: T2I-Zero separates different concepts")
    if not isinstance(p["correction"], bool) or not isinstance(p["nms"], bool) or not (p["correction"] or p["nms"]):
        raise StudioError("T2I-Zero: turn on the correction, the suppression, or both (true/false)")
    top_k = whole("top_k", p["top_k"], 1, 76)
    number("temperature", p["temperature"], 1e-4, 100)
    number("suppress", p["suppress"], 0, 1)
    number("the fraction of steps to steer", p["until"], 1e-9, 1)
    smooth = p["smooth"]
    if (not isinstance(smooth, (list, tuple)) or len(smooth) != 2 or isinstance(smooth[0], bool)
            or not isinstance(smooth[0], int) or smooth[0] < 1 or smooth[0] % 2 == 0):
        raise StudioError(f"smooth is [kernel, sigma] with an odd kernel size >= 1 (got {smooth!r})")
    number("smoothing sigma", smooth[1], 1e-3, 100)
    return {**p, "words": words, "top_k": top_k}


def correct_by_similarities(embeds: torch.Tensor, positions: list[list[int]], lengths: list[int],
                            top_k: int = 3, temperature: float = 0.1) -> torch.Tensor:
    """T2I-Zero's correction: each concept token becomes the softmax(cos / T) mix of its top_k most similar words."""
    out = embeds.clone()
    for r, (pos, n) in enumerate(zip(positions, lengths)):
        words = embeds[r, 1:n - 1].float()  # the prompt's word tokens: no SOS, EOS or padding
        for c in pos:
            if 1 <= c < n - 1:
                cos = F.cosine_similarity(embeds[r, c].float()[None], words, dim=-1)
                top = cos.topk(min(top_k, len(words)))
                weights = (top.values / temperature).softmax(0)
                out[r, c] = (weights[:, None] * words[top.indices]).sum(0).to(out.dtype)
    return out


def nms_bias(probs: torch.Tensor, groups: list[list[list[int]]], hw: tuple[int, int], smooth=(3, 0.5),
             suppress: float = 0.0) -> torch.Tensor:
    """Cross-token NMS as a bias: per pixel only the word of largest smoothed attention keeps its keys."""
    out = torch.zeros_like(probs, dtype=torch.float32)
    floor = math.log(suppress) if suppress > 0 else NEG
    h, w = hw
    for r, words in enumerate(groups):
        live = [g for g in ([p for p in pos if p < probs.shape[-1]] for pos in words) if g]
        if len(live) < 2:
            continue
        maps = torch.stack([probs[r][:, g].float().mean(-1) for g in live]).reshape(len(live), h, w)
        kernel, sigma = smooth
        if kernel > 1 and min(h, w) > kernel // 2:
            maps = gaussian_smooth(maps, int(kernel), float(sigma))
        winner = maps.flatten(1).argmax(0)
        for j, g in enumerate(live):
            out[r][:, g] = torch.where((winner != j)[:, None], floor, 0.0)
    return out


class T2IZeroSteering(Steering):
    def __init__(self, pipe, p: dict):
        super().__init__(pipe, p["words"], p["until"], edit_digest(p, {}))
        self.p = p

    def condition(self, cond, plan: steering.Plan):
        if self.positions is None:
            return cond
        flat = [[c for pos in row for c in pos] for row in self.positions[::plan.images]]
        return replace(cond, embeds=correct_by_similarities(cond.embeds, flat, self.lengths[::plan.images],
                                                            self.p["top_k"], self.p["temperature"]))

    def bias(self, attn, q, k, hw):
        return nms_bias(attention_probs(attn, q, k).mean(1), self.positions, hw, self.p["smooth"], self.p["suppress"])


@edit_kind("compose_t2i_zero")
def apply_t2i_zero(pipe, params: dict, tensors: dict, patch) -> None:
    p = check_t2i_zero(params)
    t2i, name = T2IZeroSteering(pipe, p), "T2I-Zero " + ", ".join(p["words"])
    if p["correction"]:
        steering.install(patch, pipe, "condition", name, t2i)
    if p["nms"]:
        t2i.install(patch, name)
