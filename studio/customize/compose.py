"""Several learned concepts in one image: four ways, each one Edit on the stack (undoable, in the history).

- merge_edit: Custom Diffusion's closed-form merge, per cross-attention K/V layer W = argmin ‖W·C_reg − W₀·C_reg‖
  s.t. W·C_tgt = V_tgt (outputs on the concepts' token features exact, ordinary captions' kept).
- adapters_edit: one unfused peft LoRA adapter per concept at its weight, all active; full deltas as factors.
- region_edit: a region's words can be attended only by pixels inside it (Concept Conductor / LoRA-Composer).
- t2i_zero_edit: Multi-Concept T2I-Zero's correction by similarities and cross-token non-maximum suppression.
The last two are steering slots (attention bias, 'condition'), no weights; region edits are applied in collage.py.
"""
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
from .train import DEFAULT_TEMPLATES, fill, kv_modules

NEG = -1e4  # additive attention bias that removes a key (exp(-1e4) == 0) and stays finite in fp16
REG_TEMPLATES = ("a photo of a {}", "a painting of a {}", "a {} in the street", "a close-up of a {}",
                 "a {} on a table", "a drawing of a {}", "a {} at night", "a black and white photo of a {}",
                 "a {} in the snow", "a small {}")
REG_WORDS = ("dog", "cat", "car", "house", "tree", "person", "bird", "flower", "chair", "bicycle", "boat", "mountain",
             "city", "horse", "cup", "book", "child", "river", "lamp", "train")
# ordinary captions whose K/V outputs the merge preserves by default (Custom Diffusion uses 200 LAION captions)
REG_PROMPTS = tuple(t.format(w) for t in REG_TEMPLATES for w in REG_WORDS)
RIDGE = 1e-6  # the merge's ridge, relative to the mean eigenvalue (see merge_map)


# -- shared checks ----------------------------------------------------------------------------------
def check_concepts(concepts, least: int, need_token: bool = False) -> list[Edit]:
    """Learned-concept edits with distinct tokens, at least `least` of them; StudioError otherwise."""
    concepts = list(concepts or [])
    if len(concepts) < least:
        raise StudioError(f"composing needs at least {least} learned concept{'s' * (least > 1)} "
                          f"(got {len(concepts)})")
    tokens = set()
    for c in concepts:
        if not isinstance(c, Edit) or c.kind != "learned_concept":
            what = f"{c.title!r} (kind {c.kind!r})" if isinstance(c, Edit) else type(c).__name__
            raise StudioError(f"{what} is not a learned concept: only concepts from the Customize tab can be composed")
        token = c.params.get("token")
        if token is None and need_token:
            raise StudioError(f"{c.title!r} has no token, and the merge needs each concept's token features: "
                              "compose it as a weighted adapter instead")
        if token is not None:
            if token in tokens:
                raise StudioError(f"two concepts use the token {token!r}: train one again under another token")
            tokens.add(token)
            emb = c.tensors.get("embedding")
            if emb is None or emb.dim() != 2:
                raise StudioError(f"{c.title!r} has no valid 'embedding' tensor: it is damaged; train or import "
                                  "it again")
    return concepts


# -- (a) closed-form merge (Custom Diffusion) --------------------------------------------------------
@torch.no_grad()
def reg_gram(pipe, prompts: list[str]) -> torch.Tensor:
    """Σ c cᵀ over every position but SOS of every caption (what the UNet's K/V see): d x d, float64."""
    gram = 0
    for i in range(0, len(prompts), 50):
        x = models.of(pipe).encode(prompts[i:i + 50]).embeds.float()[:, 1:]
        x = x.reshape(-1, pipe.text_encoder.config.hidden_size).double().cpu()
        gram = gram + x.T @ x
    return gram


@torch.no_grad()
def token_features(pipe, concept: Edit, templates) -> torch.Tensor:
    """(m, d): text-encoder outputs at the concept's token positions in `templates`, computed with the
    concept applied (its token, and any text-encoder change) in a throw-away patch."""
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
    """T (m x d) such that every layer's merged change is ΔW = R·T, R (out x m) its residuals V_tgt − W₀·C_tgt.

    Lagrange: min tr(ΔW A ΔWᵀ) s.t. ΔW·Cᵀ = R gives ΔW = R (C A⁻¹ Cᵀ)⁻¹ C A⁻¹, with A = C_regᵀC_reg.
    Both inverses get a ridge relative to their mean eigenvalue, so near-duplicate targets stay stable.
    """
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    a_inv_ct = torch.linalg.solve(gram + ridge * gram.trace() / len(gram) * eye, targets.T)  # A⁻¹ Cᵀ: d x m
    inner = targets @ a_inv_ct
    inner = inner + ridge * inner.trace() / len(inner) * torch.eye(len(inner), dtype=torch.float64)
    return torch.linalg.solve(inner, a_inv_ct.T)


def merge_edit(pipe, concepts: list[Edit], reg_prompts: list[str] | None = None) -> Edit:
    """Merge concepts' K/V changes in closed form (Custom Diffusion): call it with the manager's lock held.

    C_tgt: each concept's token features in training's templates; C_reg: all positions of `reg_prompts`
    (default: REG_PROMPTS, 200 ordinary captions). Changes outside attn2 K/V are summed.
    """
    concepts = check_concepts(concepts, 2, need_token=True)
    for c in concepts:
        check_base(pipe, c.params)
    templates, ridge = list(DEFAULT_TEMPLATES), RIDGE
    reg_prompts = [str(p) for p in (REG_PROMPTS if reg_prompts is None else reg_prompts) if str(p).strip()]
    if len(reg_prompts) < 10:
        raise StudioError(f"the merge needs ordinary captions to preserve (about 200; got {len(reg_prompts)})")
    kv = sorted(kv_modules(pipe.unet))
    if not kv:
        raise StudioError("this UNet has no plain cross-attention K/V layers (are adapters installed? undo them first)")

    features = [token_features(pipe, c, templates) for c in concepts]
    targets, gram = torch.cat(features), reg_gram(pipe, reg_prompts)
    T = merge_map(targets, gram, ridge)
    strengths = [check_strength(c.params.get("strength", 1.0)) for c in concepts]
    tensors, errors, reg = {}, [0.0] * len(concepts), {"merged": 0.0, "summed": 0.0, "base": 0.0}
    for name in kv:
        w0 = find_tensor(pipe, name).detach().double().cpu()
        deltas = [weight_delta(c.tensors, name, w0.shape) for c in concepts]
        deltas = [None if d is None else s * d.double() for d, s in zip(deltas, strengths)]
        if all(d is None for d in deltas):
            continue
        parts = [torch.zeros(len(w0), len(f), dtype=torch.float64) if d is None else d @ f.T
                 for d, f in zip(deltas, features)]
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
    for i, c in enumerate(concepts):
        tensors[f"embedding.{i}"] = c.tensors["embedding"].float().cpu()
    notes = [f"{t}: textual inversion only (its token joins; its K/V outputs are kept as they are)"
             for t, c in zip(tokens, concepts) if not any(n in kv for n in c.params.get("modules", []))]
    if owners:
        count = len({n for names in owners.values() for n in names})
        notes.append(f"{count} weight change(s) outside cross-attention K/V were summed, not merged "
                     f"({'; '.join(f'{t}: {len(n)}' for t, n in owners.items())}); where concepts share a layer "
                     "they may interfere")
    ratio = lambda key: round(math.sqrt(reg[key] / reg["base"]), 6) if reg["base"] else 0.0  # noqa: E731
    params = dict(tokens=tokens, concepts=[c.title for c in concepts], modules=sorted(n.removesuffix(".delta")
                  for n in tensors if n.endswith(".delta")), base_model=base_signature(pipe),
                  reg_prompts=len(reg_prompts), templates=templates, ridge=ridge, notes=notes,
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


# -- (b) weighted adapters (peft, unfused) -----------------------------------------------------------
def lora_factors(tensors: dict, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of a concept's change of `name`; a full delta becomes exact full-rank factors by SVD
    (B = U·S, A = Vᴴ, no truncation), so Custom Diffusion's K/V changes can ride as adapters too."""
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
    """Every concept as its own peft LoRA adapter at `weights` (default 1 each), unfused, all active: the
    weights stay adjustable without refitting anything (one concept is fine too)."""
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
                    raise StudioError(f"{name} already carries peft adapters (another adapter composition?): "
                                      "undo it first")
                kind = next((k for t, k in ((nn.Linear, LoraLinear), (nn.Conv2d, LoraConv2d))
                             if isinstance(base, t)), None)
                if kind is None:
                    raise StudioError(f"{name}: adapters ride only on linear and conv layers, "
                                      f"not {type(base).__name__}")
                layer = kind(base, adapter, config=config, r=len(a), lora_alpha=len(a))
                layers[name] = (layer, parent, attr)
            for mod, value in ((layer.lora_A[adapter], a), (layer.lora_B[adapter], b)):
                if tuple(mod.weight.shape) != tuple(value.shape):
                    raise StudioError(f"{name}: the concept's factors have shape {tuple(value.shape)}, this layer "
                                      f"needs {tuple(mod.weight.shape)} (learned on another architecture)")
                with torch.no_grad():
                    mod.weight.copy_(value)
            layer.set_scale(adapter, scale)  # peft's per-adapter scaling: alpha / r (= 1) times the weight
    for layer, parent, attr in layers.values():
        layer.set_adapter(list(layer.lora_A.keys()), inference_mode=True)  # all active at once
        patch.set_attr(parent, attr, layer)
    for i, e in enumerate(entries):
        if e.get("token") is not None:
            models.of(pipe).install_tokens(e["token"], tensors[f"{i}/embedding"], patch)


# -- steering: what (c) and (d) share --------------------------------------------------------------
class Steering(PromptWords):
    """An additive bias on the conditional rows' cross-attention during the first `until` of the denoising
    passes (regions, T2I-Zero's suppression): subclasses give `bias(attn, q, k, hw)` -> (rows, N, T)."""

    def __init__(self, pipe, words: list[str], until: float, signature: str):
        super().__init__(pipe, words, signature)
        self.until, self.first_site = until, None

    def tick(self, batch: int) -> None:
        """Called once per UNet pass (by the first cross-attention layer); guidance passes do not count."""
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
        """An 'attention' slot on every cross-attention site."""
        sites = models.of(self.pipe).attention_sites(cross=True)
        if not sites:
            raise StudioError("this UNet has no cross-attention layers to steer")
        self.first_site = next(iter(sites))
        steering.install(patch, self.pipe, "attention", name, self, sites)

    def wrap(self, site: str, attn, processor):
        """A SteeredAttention around the site's processor, joining one already there."""
        clock = site == self.first_site
        if isinstance(processor, SteeredAttention):
            return SteeredAttention(processor.base, processor.steerings + [self], clock)
        if type(processor).__name__ in STANDARD_PROCESSORS:
            return SteeredAttention(processor, [self], clock)
        raise StudioError(f"{site.removesuffix('.processor')} uses the attention processor "
                          f"{type(processor).__name__} (installed by another edit or adapter): undo that first")


class SteeredAttention:
    """attn2 processor: SDPA plus the sum of its steerings' biases on the conditional rows (an attention mask: the
    fused kernel stays); a pass with nothing to steer goes to the original processor unchanged."""

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
        heads, d = q.shape[1], q.shape[3]
        v = attn.to_v(context).view(b, -1, heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None].to(q.dtype), dropout_p=0.0)
        out = out.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


# -- (c) region-aware sampling ----------------------------------------------------------------------
def region_edit(regions: list[tuple[str, object]], *, until: float = 0.5, collage: float = 0.0) -> Edit:
    """Each (words, region): the words' tokens are attended only inside the region, a box (x0, y0, x1, y1) in
    fractions of the image or a 2-D mask of any size; `until`: the fraction of steps to steer (the layout is
    fixed early: on the toy model half the steps kept both objects in 7/8 images, all of them in 6/8).
    `collage` > 0 composes by collage instead (collage.py), redrawing that share of the steps."""
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
            raise StudioError(f"region {i + 1}: say which words of the prompt go in it (e.g. 'red circle' or "
                              "'<my-cat>')")
        if words.strip() in seen:
            raise StudioError(f"the words {words!r} have two regions: give each words one region (draw a mask for "
                              "several areas)")
        seen.add(words.strip())
        if "box" in s:
            box = s["box"]
            ok = len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                       for v in box)
            if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
                raise StudioError(f"region {i + 1} ({words!r}): a box is (x0, y0, x1, y1) in fractions of the image "
                                  f"with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (got {box!r})")
        else:
            mask = tensors.get(s.get("mask", ""))
            if mask is None or mask.dim() != 2 or not mask.numel():
                raise StudioError(f"region {i + 1} ({words!r}): a mask must be a 2-D array (height x width, one "
                                  f"channel); got shape {None if mask is None else tuple(mask.shape)}")
            if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() <= 0:
                raise StudioError(f"region {i + 1} ({words!r}): the mask is empty (or has negative or non-finite "
                                  "values): paint the area where the words belong")
    number("the fraction of steps to steer", params.get("until", 1.0), 1e-9, 1)
    number("the collage's share of steps to redraw", params.get("collage", 0.0), 0, 1)


def region_grid(spec: dict, mask: torch.Tensor | None, hw: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: the region at an attention resolution (pixel centres in a box; a mask resized and
    thresholded at 0.5). Never empty: a region smaller than one cell keeps its best cell."""
    h, w = hw
    if "box" in spec:
        x0, y0, x1, y1 = spec["box"]
        ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
        soft = (((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None]).float()
        if not soft.any():
            soft[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = 1
    else:
        soft = F.interpolate(mask[None, None].float(), size=(h, w), mode="bilinear", antialias=True,
                             align_corners=False)[0, 0]
    inside = soft >= 0.5
    return inside if inside.any() else soft >= soft.max()


class RegionSteering(Steering):
    """A region's tokens can be attended only by query pixels inside it: pixels outside lose them, so pixels
    inside one region also never see another region's tokens."""

    def __init__(self, pipe, params: dict, tensors: dict):
        specs = params["regions"]
        super().__init__(pipe, [s["words"].strip() for s in specs], params.get("until", 1.0),
                         edit_digest(params, tensors))
        self.specs, self.tensors, self.grids = specs, tensors, {}

    def bias(self, attn, q, k, hw):
        if hw not in self.grids:
            self.grids[hw] = torch.stack([region_grid(s, self.tensors.get(s.get("mask", "")), hw).flatten()
                                          for s in self.specs])
        inside = self.grids[hw].to(q.device)
        out = torch.zeros(q.shape[0], q.shape[2], k.shape[2], device=q.device)
        for r, groups in enumerate(self.positions):
            for j, pos in enumerate(groups):
                pos = [p for p in pos if p < out.shape[-1]]
                if pos:
                    out[r][:, pos] = torch.where(inside[j, :, None], 0.0, NEG)
        return out


# -- (d) Multi-Concept T2I-Zero ---------------------------------------------------------------------
# Not the paper's values (not checkable offline): A&E's smoothing, hard suppression, top-3 / temperature 0.1.
T2I_ZERO_DEFAULTS = dict(correction=True, top_k=3, temperature=0.1, nms=True, suppress=0.0, smooth=[3, 0.5], until=1.0)


def t2i_zero_edit(words: list[str], **options) -> Edit:
    """Multi-Concept T2I-Zero for the concept `words` of the prompt (learned tokens or plain words):
    `correction` (top_k, temperature; see correct_by_similarities) and/or `nms` (suppress, smooth=[kernel,
    sigma], until; see nms_bias)."""
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
        raise StudioError("T2I-Zero needs at least two concept words of the prompt (e.g. '<my-cat>', '<my-dog>'), "
                          "none of them empty")
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
    """T2I-Zero's correction: a concept token's embedding becomes the softmax(cos / temperature) mix of the top_k
    word tokens of its prompt most similar to it (itself included), shedding what the causal encoder mixed in."""
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
    """Cross-token non-maximum suppression as a bias (rows, N, T): per pixel, of each row's concept words (groups
    [row]: positions per word) only the one of largest smoothed attention (probs: head mean) keeps its keys; the
    others get log(suppress)."""
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
        """The correction, on the conditional rows (one per prompt; `positions` has one per image)."""
        if self.positions is None:
            return cond
        flat = [[c for pos in row for c in pos] for row in self.positions[::plan.images]]
        return replace(cond, embeds=correct_by_similarities(cond.embeds, flat, self.lengths[::plan.images],
                                                            self.p["top_k"], self.p["temperature"]))

    def bias(self, attn, q, k, hw):
        probs = attention_probs(attn, q, k).mean(1)
        return nms_bias(probs, self.positions, hw, self.p["smooth"], self.p["suppress"])


@edit_kind("compose_t2i_zero")
def apply_t2i_zero(pipe, params: dict, tensors: dict, patch) -> None:
    p = check_t2i_zero(params)
    t2i, name = T2IZeroSteering(pipe, p), "T2I-Zero " + ", ".join(p["words"])
    if p["correction"]:
        steering.install(patch, pipe, "condition", name, t2i)
    if p["nms"]:
        t2i.install(patch, name)
