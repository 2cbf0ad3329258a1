"""From captured attention to word maps: select layers, steps and heads, aggregate, normalize, binarize.

Each layer's map is upsampled to a common grid (the finest selected layer) and averaged over the
selected layers; a word's map is the mean over its subword tokens (DAAM). Normalization: "word"
(each map to its own max), "range" (each map's min..max to 0..1: removes the flat floor that
unlocalized layers add), "global" (all shown maps share one max) or "absolute" (attention
probabilities as they are). Binarization keeps pixels at or above tau of the normalized map
(DAAM's masks: 0.4 of each word's max). All pure functions of an AttentionResult.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import torch
import torch.nn.functional as F

from ..errors import StudioError
from .result import AttentionResult
from .tokens import Word, resolve_words

BLOCKS = ("down", "mid", "up")
NORMALIZATIONS = ("word", "range", "global", "absolute")


@dataclass(frozen=True)
class Selection:
    resolutions: tuple[int, ...] | None = None  # layer heights to use; None: all
    blocks: tuple[str, ...] = BLOCKS
    head: int | None = None                     # None: mean over heads
    steps: tuple[int, int] | None = None        # inclusive 0-based step range; None: every step
    branch: str = "prompt"                      # "prompt" or "negative"


def layer_names(result: AttentionResult, sel: Selection) -> list[str]:
    names = [n for n, layer in result.layers.items()
             if layer.block in sel.blocks and (sel.resolutions is None or layer.resolution in sel.resolutions)]
    if not names:
        have = ", ".join(f"{layer.block} {layer.h}x{layer.w}" for layer in result.layers.values())
        raise StudioError(f"no captured layer matches the chosen resolutions and blocks (captured: {have})")
    return names


def _check_branch(result: AttentionResult, sel: Selection) -> None:
    if sel.branch not in result.branches:
        raise StudioError("negative-prompt maps were not captured: give a negative prompt (and guidance > 1) and run again")


def _layer_map(result: AttentionResult, name: str, sel: Selection) -> torch.Tensor:
    """One layer's (B, N, T) map for the selection's branch, head and steps."""
    _check_branch(result, sel)
    b = result.branches.index(sel.branch)
    if sel.steps is not None and tuple(sel.steps) != (0, result.steps - 1):
        lo, hi = int(sel.steps[0]), int(sel.steps[1])
        if not 0 <= lo <= hi < result.steps:
            raise StudioError(f"step range {lo}..{hi} is outside the captured steps 0..{result.steps - 1}")
        if result.per_step is None:
            raise StudioError("per-step maps were not kept: turn on 'keep every step' and run again")
        if sel.head is not None:
            raise StudioError("one head can be shown only over all steps (per-step maps are kept head-averaged)")
        return result.per_step[name][lo:hi + 1, b].float().mean(0)
    m = result.means[name][b]
    if result.heads is None:
        if sel.head is not None:
            raise StudioError("heads were averaged during capture: turn on 'keep heads' and run again")
        return m
    if sel.head is None:
        return m.mean(1)
    if not 0 <= int(sel.head) < result.heads:
        raise StudioError(f"head {sel.head} does not exist: the layers have heads 0..{result.heads - 1}")
    return m[:, int(sel.head)]


def token_maps(result: AttentionResult, sel: Selection = Selection()) -> torch.Tensor:
    """(B, T, h, w): every token's map, mean over the selected layers on the finest selected grid."""
    names = layer_names(result, sel)
    h = max(result.layers[n].h for n in names)
    w = max(result.layers[n].w for n in names)
    out = 0
    for name in names:
        layer = result.layers[name]
        m = _layer_map(result, name, sel)
        m = m.transpose(1, 2).reshape(m.shape[0], m.shape[2], layer.h, layer.w)
        if (layer.h, layer.w) != (h, w):
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        out = out + m
    return out / len(names)


def word_maps(result: AttentionResult, words: list[Word] | str | None = None, sel: Selection = Selection(),
              size: tuple[int, int] | None = None) -> tuple[list[Word], torch.Tensor]:
    """The words and their maps (B, W, h, w), upsampled to `size` (h, w) when given."""
    _check_branch(result, sel)
    prompt = result.negative if sel.branch == "negative" else result.prompt
    if not (isinstance(words, list) and words and all(isinstance(w, Word) for w in words)):
        words = resolve_words(result.tokenizer, prompt, words)
    tokens = token_maps(result, sel)
    t = tokens.shape[1]
    for w in words:
        if max(w.positions) >= t:
            raise StudioError(f"{w.text!r} lies beyond the captured tokens")
    maps = torch.stack([tokens[:, list(w.positions)].mean(1) for w in words], 1)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bicubic", align_corners=False).clamp_min(0)
    return words, maps


def normalize(maps: torch.Tensor, mode: str = "word") -> torch.Tensor:
    """maps (B, W, h, w) -> same shape, scaled for display (see the module docstring)."""
    if mode == "word":
        return maps / maps.amax((-2, -1), keepdim=True).clamp_min(1e-12)
    if mode == "range":
        lo = maps.amin((-2, -1), keepdim=True)
        return (maps - lo) / (maps.amax((-2, -1), keepdim=True) - lo).clamp_min(1e-12)
    if mode == "global":
        return maps / maps.amax((-3, -2, -1), keepdim=True).clamp_min(1e-12)
    if mode == "absolute":
        return maps
    raise StudioError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATIONS)}")


def binarize(maps: torch.Tensor, tau: float = 0.4) -> torch.Tensor:
    if not 0 <= tau <= 1:
        raise StudioError(f"the threshold tau must be from 0 to 1 (got {tau})")
    return maps >= tau


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """A-STAR's segregation measure: sum(min(a, b)) / sum(a + b) of two maps (0: apart, 0.5: identical)."""
    return float(torch.minimum(a, b).sum() / (a + b).sum().clamp_min(1e-12))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def retention(result: AttentionResult, words: list[Word], sel: Selection, tau: float, image: int = 0) -> list[float | None]:
    """Per word: mean IoU of its binarized mask between consecutive steps (None without per-step maps)."""
    if result.per_step is None or result.steps < 2:
        return [None] * len(words)
    lo, hi = sel.steps or (0, result.steps - 1)
    masks = [binarize(normalize(word_maps(result, words, Selection(sel.resolutions, sel.blocks, None, (s, s),
                                                                   sel.branch))[1][image:image + 1]), tau)[0]
             for s in range(lo, hi + 1)]
    if len(masks) < 2:
        return [None] * len(words)
    return [sum(iou(a[i], b[i]) for a, b in zip(masks, masks[1:])) / (len(masks) - 1) for i in range(len(words))]


def summary(result: AttentionResult, words=None, sel: Selection = Selection(), tau: float = 0.4,
            image: int = 0) -> dict:
    """Per word: peak probability and where, area above tau, step-to-step retention; pairwise overlaps."""
    words, maps = word_maps(result, words, sel)
    raw = maps[image]
    norm = normalize(maps, "word")[image]
    keep = retention(result, words, sel, tau, image)
    rows = []
    for i, w in enumerate(words):
        peak = int(raw[i].argmax())
        rows.append(dict(word=w.text, tokens=list(w.positions), peak=float(raw[i].max()),
                         peak_at=(peak % raw.shape[-1], peak // raw.shape[-1]),
                         area=float(binarize(norm[i], tau).float().mean()), retention=keep[i]))
    pairs = {(words[i].text, words[j].text): overlap(norm[i], norm[j])
             for i, j in combinations(range(len(words)), 2) if not (words[i].special or words[j].special)}
    for r in rows:
        others = [(v, b if a == r["word"] else a) for (a, b), v in pairs.items() if r["word"] in (a, b)]
        r["max_overlap"], r["overlaps_most_with"] = max(others) if others else (None, None)
    return dict(rows=rows, overlaps=pairs, grid=tuple(raw.shape[-2:]), tau=tau)
