"""Closed-form cross-attention erasure (UCE), with RECE hardening rounds and RealEra neighbour mining.

UCE's per-layer solution for every cross-attention K/V weight W is W·T with one shared d×d map T (one solve);
RECE then erases the embedding that still regenerates the concept in the edited layers; RealEra adds random
neighbours of the concept's vectors to the erase set and further-out samples to the preserve set.
"""
from __future__ import annotations

import torch

from .. import models
from ..edits import Edit, edit_kind
from ..checks import known, number, whole
from ..errors import StudioError
from .text import concept_rows, templates_for

DEFAULTS = dict(guide="", preserve=[], templates="object", tokens="to_end", lam=0.5, erase_scale=1.0,
                preserve_scale=1.0, layers="kv", rece_rounds=0, rece_lambda=1e-3, neighbours=0,
                neighbour_band=[0.9, 1.0], beyond_band=[0.3, 0.6], seed=0)
LAYER_SUFFIXES = {"kv": ("attn2.to_k.weight", "attn2.to_v.weight"), "k": ("attn2.to_k.weight",),
                  "v": ("attn2.to_v.weight",)}


def erase_edit(erase: list[str] | str, **params) -> Edit:
    """An erasure edit: `erase` concepts become `guide`, `preserve` concepts keep their outputs."""
    erase = [erase] if isinstance(erase, str) else list(erase)
    p = {**DEFAULTS, **params, "erase": erase}
    how = "+".join(["UCE"] + (["RECE"] if p["rece_rounds"] else []) + (["RealEra"] if p["neighbours"] else []))
    return Edit("erase_closed_form", p, label=f"erase {', '.join(map(repr, erase))} → {p['guide']!r} ({how})")


def check_params(params: dict) -> dict:
    known(params, {*DEFAULTS, "erase"}, "erasure")
    p = {**DEFAULTS, **params}
    erase = [c.strip() for c in p.get("erase", []) if c.strip()]
    if not erase:
        raise StudioError("type at least one concept to erase")
    guides = p["guide"] if isinstance(p["guide"], list) else [p["guide"]] * len(erase)
    if len(guides) != len(erase):
        raise StudioError(f"give one guide per concept ({len(erase)}) or a single guide for all")
    for c, g in zip(erase, guides):
        if c.lower() == g.strip().lower():
            raise StudioError(f"{c!r} cannot be erased toward itself: choose another guide (or leave it empty)")
    preserve = [c.strip() for c in p["preserve"] if c.strip()]
    clash = sorted({c for c in preserve if c.lower() in {e.lower() for e in erase}})
    if clash:
        raise StudioError(f"{', '.join(clash)} is both erased and preserved: remove it from one of the lists")
    for key in ("lam", "erase_scale", "preserve_scale", "rece_lambda"):
        p[key] = number(key, p[key], 0, 1e6)
    if p["lam"] <= 0 and not preserve:
        raise StudioError("λ must be > 0 when nothing is preserved (the system would be singular)")
    if p["layers"] not in LAYER_SUFFIXES:
        raise StudioError(f"layers must be one of {', '.join(LAYER_SUFFIXES)} (got {p['layers']!r})")
    p["rece_rounds"] = whole("RECE rounds", p["rece_rounds"], 0, 5)
    p["neighbours"] = whole("neighbour samples per vector", p["neighbours"], 0, 64)
    for key in ("neighbour_band", "beyond_band"):
        lo, hi = p[key]
        if not -1 <= lo <= hi <= 1:
            raise StudioError(f"{key} is a cosine range [low, high] with -1 ≤ low ≤ high ≤ 1 (got {p[key]!r})")
    templates = templates_for(p["templates"], erase[0])
    return {**p, "erase": erase, "guide": guides, "preserve": preserve, "templates": templates}


def edited_layers(pipe, layers: str = "kv") -> list[str]:
    names = [n for n in models.of(pipe).text_projections() if n.endswith(LAYER_SUFFIXES[layers])]
    if not names:
        raise StudioError("this UNet has no cross-attention K/V layers to edit")
    return names


def solve_map(E, G, P, lam: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """T with W·T the UCE solution for every layer W (row vectors: E, G erase/guide pairs, P preserved)."""
    d = E.shape[1]
    eye = torch.eye(d, dtype=torch.float64, device=E.device)
    E, G, P = E.double(), G.double(), P.double()
    M = lam * eye + erase_scale * G.T @ E + preserve_scale * P.T @ P
    B = lam * eye + erase_scale * E.T @ E + preserve_scale * P.T @ P
    return torch.linalg.solve(B, M.T).T  # B is symmetric: M B⁻¹ = (B⁻¹ Mᵀ)ᵀ


def attack_map(gram: torch.Tensor, T: torch.Tensor, lam: float) -> torch.Tensor:
    """RECE: R with c' = R c = (Σ W'ᵀW' + λI)⁻¹ Σ W'ᵀW c, W' = W·T, gram = Σ WᵀW over the edited layers."""
    eye = torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
    return torch.linalg.solve(T.T @ gram @ T + lam * eye, T.T @ gram)


def neighbours(rows: torch.Tensor, count: int, band, generator: torch.Generator) -> torch.Tensor:
    """`count` random vectors per row, of the row's norm, at a cosine similarity to it drawn from `band`."""
    if count == 0:
        return rows[:0]
    base = rows.repeat_interleave(count, 0)
    unit = base / base.norm(dim=1, keepdim=True)
    noise = torch.randn(base.shape, generator=generator, dtype=base.dtype).to(base.device)
    ortho = noise - (noise * unit).sum(1, keepdim=True) * unit
    ortho = ortho / ortho.norm(dim=1, keepdim=True)
    cos = torch.empty(len(base), 1, dtype=base.dtype).uniform_(*band, generator=generator).to(base.device)
    return base.norm(dim=1, keepdim=True) * (cos * unit + (1 - cos ** 2).sqrt() * ortho)


def erase_sets(pipe, p: dict):
    """(E, G, P): erase vectors, their guide vectors and preserved vectors."""
    gen = torch.Generator().manual_seed(int(p["seed"]))
    E, G, P = [], [], []
    for concept, guide in zip(p["erase"], p["guide"]):
        e, g = concept_rows(pipe, p["templates"], concept, guide, p["tokens"])
        E += [e, neighbours(e, p["neighbours"], p["neighbour_band"], gen)]
        G += [g, g.repeat_interleave(p["neighbours"], 0)]
        P.append(neighbours(e, p["neighbours"], p["beyond_band"], gen))
    for concept in p["preserve"]:
        P.append(concept_rows(pipe, p["templates"], concept, concept, p["tokens"])[0])
    return torch.cat(E), torch.cat(G), torch.cat(P)


@edit_kind("erase_closed_form")
def apply_closed_form(pipe, params: dict, tensors: dict, patch) -> None:
    p = check_params(params)
    E, G, P = erase_sets(pipe, p)
    T = solve_map(E, G, P, p["lam"], p["erase_scale"], p["preserve_scale"])
    names = edited_layers(pipe, p["layers"])
    if p["rece_rounds"]:
        weights = [patch.read(n).double() for n in names]
        gram = sum(W.T @ W for W in weights)
        for _ in range(p["rece_rounds"]):
            adversarial = E.double() @ attack_map(gram, T, p["rece_lambda"]).T
            # at the concept's norm: mapping a short c' onto a full-size guide output brings the concept back
            adversarial *= E.double().norm(dim=1, keepdim=True) / adversarial.norm(dim=1, keepdim=True).clamp_min(1e-9)
            # RECE: λ = s_p = 0.1
            T = T @ solve_map(adversarial, G, P, 0.1, 1.0, 0.1)
    for name in names:
        W = patch.read(name)
        patch.write(name, W.double() @ T.to(W.device))
