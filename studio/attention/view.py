"""One view of a result: the tab, the CLI and the export all draw through `render_view` (what is seen is exported)."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import StudioError
from .maps import Selection, binarize, check_branch, normalize, resolve_words, summary, word_maps
from .render import grid, labelled, overlay, shown_image
from .result import AttentionResult


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
    tiles: list              # [(PIL image, label)]
    summary: dict

    def grid(self, image, view: View):
        """The image, then every word's tile, labelled: the PNG the export writes."""
        return grid([labelled(shown_image(image, view.size), "image")] + [labelled(*t) for t in self.tiles])


def render_view(result: AttentionResult, view: View) -> Rendered:
    if not 0 <= view.image < len(result.images):
        raise StudioError(f"image {view.image} does not exist (this result has {len(result.images)})")
    prompt = check_branch(result, view.selection)
    words, maps = word_maps(result, resolve_words(result.tokenizer, prompt, view.words, view.special), view.selection)
    shown = normalize(maps, view.normalization)[view.image].clamp(0, 1)
    masks = binarize(shown, view.tau)
    tiles = [(overlay(result.images[view.image], shown[i], view.cmap, view.alpha, view.size,
                      masks[i] if view.outline else None), w.text) for i, w in enumerate(words)]
    return Rendered(words, tiles, summary(result, words, view.selection, view.tau, view.image))
