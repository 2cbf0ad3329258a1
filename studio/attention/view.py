"""One view of a result: which words, layers, steps and head, how normalized, drawn how.

The tab, the CLI and the export all draw through `render_view`, so what a user sees is what
they export.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import StudioError
from .maps import Selection, binarize, normalize, summary, word_maps
from .render import word_grid, word_tiles
from .result import AttentionResult
from .tokens import resolve_words


@dataclass
class View:
    words: str | list | None = None          # comma-separated or a list; None: every word
    special: bool = False                    # also show SOS/EOS
    selection: Selection = field(default_factory=Selection)
    normalization: str = "word"
    tau: float = 0.4
    outline: bool = False                    # draw the binarized mask's outline on each map
    cmap: str = "jet"
    alpha: float = 0.5
    image: int = 0
    size: int = 256

    def describe(self) -> dict:
        s = self.selection
        return dict(words=self.words, special=self.special, resolutions=s.resolutions, blocks=list(s.blocks),
                    head=s.head, steps=s.steps, branch=s.branch, normalization=self.normalization, tau=self.tau,
                    outline=self.outline, cmap=self.cmap, alpha=self.alpha, image=self.image)


@dataclass
class Rendered:
    words: list
    raw: torch.Tensor        # (W, h, w) attention probabilities on the layer grid
    shown: torch.Tensor      # (W, h, w) normalized as asked
    masks: torch.Tensor      # (W, h, w) bool at tau
    tiles: list              # [(PIL image, label)]
    summary: dict

    def grid(self, image, view: View):
        return word_grid(image, [label for _, label in self.tiles], self.shown, view.cmap, view.alpha,
                         self.masks if view.outline else None, view.size)


def render_view(result: AttentionResult, view: View) -> Rendered:
    if not 0 <= view.image < len(result.images):
        raise StudioError(f"image {view.image} does not exist (this result has {len(result.images)})")
    if view.selection.branch not in result.branches:
        raise StudioError("negative-prompt maps were not captured: give a negative prompt (and guidance > 1) and run again")
    prompt = result.negative if view.selection.branch == "negative" else result.prompt
    words = resolve_words(result.tokenizer, prompt, view.words, view.special)
    words, maps = word_maps(result, words, view.selection)
    raw = maps[view.image]
    shown = normalize(maps, view.normalization)[view.image].clamp(0, 1)
    masks = binarize(shown, view.tau)
    tiles = word_tiles(result.images[view.image], [w.text for w in words], shown, view.cmap, view.alpha,
                       masks if view.outline else None, view.size)
    return Rendered(words, raw, shown, masks, tiles, summary(result, words, view.selection, view.tau, view.image))
