"""A learned concept as one edit: new token(s) ("token", may be None; "more_tokens") installed through the edit
stack, tensors "embedding" [vectors, d] ("embedding.1", ...) and per changed weight "{name}.lora_A/B" or ".delta"."""
from __future__ import annotations

import math

import torch

from .. import models
from ..checks import base_signature, check_base, number  # noqa: F401  (base_signature: for importers)
from ..edits import Edit, edit_kind
from ..errors import StudioError
from ..training import concept_label
from .scope import check_scope, install_scoped

MAX_VECTORS = 16


def factors(tensors: dict, name: str, shape) -> tuple | None:
    """The change of weight `name` as (A, B) of a LoRA (conv: B a 1x1 conv) or (delta,), or None."""
    if f"{name}.delta" in tensors:
        delta = tensors[f"{name}.delta"].float()
        fits = delta.numel() == math.prod(shape)
    elif f"{name}.lora_A" in tensors:
        a, b = tensors[f"{name}.lora_A"].float(), tensors[f"{name}.lora_B"].float()
        fits = len(a) == b.flatten(1).shape[1] and b.shape[0] * a[0].numel() == math.prod(shape)
    else:
        return None
    if not fits:
        raise StudioError(f"{name}: the change does not fit the weight {tuple(shape)}: learned on another architecture")
    if f"{name}.delta" in tensors:
        return (delta.reshape(shape),)
    if len(shape) == 4:
        return a.reshape(len(a), *shape[1:]), b.reshape(len(b), -1, 1, 1)
    return a.flatten(1), b.flatten(1)


def weight_delta(tensors: dict, name: str, shape) -> torch.Tensor | None:
    """The fp32 weight-shaped change of `name` (the delta, or B·A of a LoRA), or None."""
    change = factors(tensors, name, shape)
    if change is None:
        return None
    return change[0] if len(change) == 1 else (change[1].flatten(1) @ change[0].flatten(1)).reshape(shape)


def check_strength(strength) -> float:
    return number("concept strength", strength, -10, 10)


def with_strength(edit: Edit, strength: float | None = None, scope: str | None = None) -> Edit:
    if edit.kind != "learned_concept":
        raise StudioError(f"{edit.title} is not a learned concept (kind {edit.kind!r})")
    params = dict(edit.params)
    if strength is not None:
        params["strength"] = check_strength(strength)
    if scope is not None:
        if params.get("token") is None and scope == "prompt":
            raise StudioError(f"{edit.title} has no token to scope it to: it acts on every prompt")
        params["scope"] = check_scope(scope)
    return Edit(edit.kind, params, edit.tensors, label=concept_label(params))


@edit_kind("learned_concept")
def apply_learned_concept(pipe, params: dict, tensors: dict, patch) -> None:
    strength = check_strength(params.get("strength", 1.0))
    embedding = tensors.get("embedding")
    if params.get("token") is not None and (embedding is None or embedding.dim() != 2
                                            or not 1 <= len(embedding) <= MAX_VECTORS):
        raise StudioError("this concept has no valid embedding: it is damaged; train or import it again")
    check_base(pipe, params)
    in_prompt = params.get("token") is not None and params.get("scope") == "prompt"  # older concepts: always
    scoped = {}
    for name in params.get("modules", []):
        w = patch.read(name)
        change = factors(tensors, name, w.shape)
        if change is None:
            raise StudioError(f"this concept lacks the change of {name}: it is damaged; train or import it again")
        if in_prompt and name.startswith("unet."):
            scoped[name] = change
        else:
            patch.write(name, w.float() + strength * weight_delta(tensors, name, w.shape).to(w.device))
    if scoped:
        install_scoped(pipe, params, tensors, scoped, strength, patch)
    if params.get("token") is not None:
        models.of(pipe).install_tokens(params["token"], embedding, patch)
    for i, token in enumerate(params.get("more_tokens", []), 1):  # concepts extracted together share one edit
        vectors = tensors.get(f"embedding.{i}")
        if vectors is None or vectors.dim() != 2:
            raise StudioError(f"this concept lacks the embedding of {token}: it is damaged; extract it again")
        models.of(pipe).install_tokens(token, vectors, patch)
