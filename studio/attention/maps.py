"""From captured attention to word maps: layers averaged on the finest selected grid, a word's map the mean of
its tokens' (DAAM), then normalized for display and binarized at tau."""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

import torch
import torch.nn.functional as F

from ..errors import StudioError
from ..tokenizer import Word, prompt_words, token_positions
from .result import AttentionResult

BLOCKS = ("down", "mid", "up")
NORMALIZATIONS = ("word", "range", "global", "absolute")


def resolve_words(tokenizer, prompt: str, words=None, special: bool = False) -> list[Word]:
    """The given words (comma-separated or a list), or every word of the prompt."""
    words = [w for w in (words.split(",") if isinstance(words, str) else words or []) if str(w).strip()]
    if words:
        return [Word(str(w).strip(), tuple(token_positions(tokenizer, prompt, w))) for w in words]
    found = prompt_words(tokenizer, prompt, special)
    if not found:
        raise StudioError("the prompt has no words to show maps for")
    return found


@dataclass(frozen=True)
class Selection:
    resolutions: tuple[int, ...] | None = None  # layer heights to use; None: all
    blocks: tuple[str, ...] = BLOCKS
    head: int | None = None                     # None: mean over heads
    steps: tuple[int, int] | None = None        # inclusive 0-based step range; None: every step
    branch: str = "prompt"                      # "prompt" or "negative"


def layer_names(result: AttentionResult, sel: Selection) -> list[str]:
    names = [n for n, layer in result.layers.items()
             if layer.block in sel.blocks and (sel.resolutions is None or layer.h in sel.resolutions)]
    if not names:
        have = ", ".join(f"{layer.block} {layer.h}x{layer.w}" for layer in result.layers.values())
        raise StudioError(f"no captured layer matches the chosen resolutions and blocks (captured: {have})")
    return names


def check_branch(result: AttentionResult, sel: Selection) -> str:
    """The prompt of the selection's branch, if captured."""
    if sel.branch not in result.branches:
        raise StudioError("negative-prompt maps were not captured: give a negative prompt (and guidance > 1) "
                          "and run again")
    return result.negative if sel.branch == "negative" else result.prompt


def _layer_map(result: AttentionResult, name: str, sel: Selection) -> torch.Tensor:
    """One layer's (B, N, T) map for the selection's branch, head and steps."""
    check_branch(result, sel)
    b = result.branches.index(sel.branch)
    if sel.steps is not None and tuple(sel.steps) != (0, result.steps - 1):
        lo, hi = map(int, sel.steps)
        if not 0 <= lo <= hi < result.steps:
            raise StudioError(f"step range {lo}..{hi} is outside the captured steps 0..{result.steps - 1}")
        if result.per_step is None:
            raise StudioError("per-step maps were not kept: turn on 'keep every step' and run again")
        if sel.head is not None:
            raise StudioError("one head can be shown only over all steps (per-step maps are kept head-averaged)")
        return result.per_step[name][lo:hi + 1, b].float().mean(0)
    m = result.means[name][b]
    if sel.head is None:
        return m if result.heads is None else m.mean(1)
    if result.heads is None:
        raise StudioError("heads were averaged during capture: turn on 'keep heads' and run again")
    if not 0 <= int(sel.head) < result.heads:
        raise StudioError(f"head {sel.head} does not exist: the layers have heads 0..{result.heads - 1}")
    return m[:, int(sel.head)]


def token_maps(result: AttentionResult, sel: Selection = Selection()) -> torch.Tensor:
    """(B, T, h, w): every token's map, the mean of the selected layers on the finest grid."""
    layers = [result.layers[n] for n in layer_names(result, sel)]
    size = max(layer.h for layer in layers), max(layer.w for layer in layers)
    out = 0
    for layer in layers:
        m = _layer_map(result, layer.name, sel).transpose(1, 2).unflatten(2, (layer.h, layer.w))
        out = out + F.interpolate(m, size=size, mode="bilinear", align_corners=False)
    return out / len(layers)


def word_maps(result: AttentionResult, words: list[Word] | str | None = None, sel: Selection = Selection(),
              size: tuple[int, int] | None = None) -> tuple[list[Word], torch.Tensor]:
    """The words and their maps (B, W, h, w), upsampled to `size` when given."""
    prompt = check_branch(result, sel)
    if not (isinstance(words, list) and words and all(isinstance(w, Word) for w in words)):
        words = resolve_words(result.tokenizer, prompt, words)
    tokens = token_maps(result, sel)
    for w in words:
        if max(w.positions) >= tokens.shape[1]:
            raise StudioError(f"{w.text!r} lies beyond the captured tokens")
    maps = torch.stack([tokens[:, list(w.positions)].mean(1) for w in words], 1)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bicubic", align_corners=False).clamp_min(0)
    return words, maps


def normalize(maps: torch.Tensor, mode: str = "word") -> torch.Tensor:
    """(B, W, h, w) maps for display: each to its max, min..max to 0..1 (no flat floor), one max for all, or raw."""
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
    """A-STAR's segregation: sum(min(a, b)) / sum(a + b) (0: apart, 0.5: identical)."""
    return float(torch.minimum(a, b).sum() / (a + b).sum().clamp_min(1e-12))


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def retention(result: AttentionResult, words: list[Word], sel: Selection, tau: float, image: int = 0) -> list:
    """Per word: mean IoU of its masks at consecutive steps (None without per-step maps)."""
    lo, hi = sel.steps or (0, result.steps - 1)
    if result.per_step is None or hi <= lo:
        return [None] * len(words)
    masks = [binarize(normalize(word_maps(result, words, replace(sel, head=None, steps=(s, s)))[1][image:image + 1]),
                      tau)[0] for s in range(lo, hi + 1)]
    return [sum(iou(a[i], b[i]) for a, b in zip(masks, masks[1:])) / (len(masks) - 1) for i in range(len(words))]


def summary(result: AttentionResult, words=None, sel: Selection = Selection(), tau: float = 0.4,
            image: int = 0) -> dict:
    """Per word: peak probability and where, area above tau, retention; pairwise overlaps."""
    words, maps = word_maps(result, words, sel)
    raw, norm = maps[image], normalize(maps, "word")[image]
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
