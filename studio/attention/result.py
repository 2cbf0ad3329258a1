"""What one attention job leaves, on the CPU: views are redrawn without the model (sliders never queue on the
GPU). The UI holds only a ResultCache key (gr.State deep-copies)."""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ..capture import AttentionSession
from ..errors import StudioError
from ..tokenizer import Word, prompt_words


def block_of(name: str) -> str:
    return "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"


@dataclass(frozen=True)
class LayerInfo:
    name: str
    block: str  # down | mid | up
    h: int      # the layer's resolution
    w: int


@dataclass
class AttentionResult:
    mode: str                              # "generate" or "image"
    images: list                           # PIL images, one per batch row
    prompt: str
    negative: str
    seeds: list[int]
    steps: int                             # denoising steps captured (1 for an uploaded image)
    tokenizer: object
    layers: dict[str, LayerInfo]           # cross-attention layers
    means: dict[str, torch.Tensor]         # name -> (branches, B, [H,] N, T): mean over steps
    per_step: dict[str, torch.Tensor] | None  # name -> (S, branches, B, N, T), head mean, fp16
    branches: tuple[str, ...]              # ("prompt",) or ("negative", "prompt")
    heads: int | None                      # heads kept separately (None: head mean only)
    self_layers: dict[str, LayerInfo] = field(default_factory=dict)
    self_qk: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    control_log: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return self.images[0].height, self.images[0].width

    def words(self, special: bool = False, branch: str = "prompt") -> list[Word]:
        return prompt_words(self.tokenizer, self.negative if branch == "negative" else self.prompt, special)

    def resolutions(self) -> list[int]:
        return sorted({layer.h for layer in self.layers.values()}, reverse=True)


def from_session(session: AttentionSession, *, mode: str, images, prompt: str, negative: str, seeds, steps: int,
                 tokenizer, settings: dict, seconds: float = 0.0) -> AttentionResult:
    """What a session captured, on the CPU, in the (branches, B, ...) layout."""
    store = session.cross
    if not store.sums:
        raise StudioError("no cross-attention was captured: does this model have cross-attention layers?")
    branches = ("negative", "prompt") if store.negative else ("prompt",)

    def split(t: torch.Tensor) -> torch.Tensor:  # (rows, ...) -> (branches, B, ...)
        return t.unflatten(0, (len(branches), -1))

    def info(name: str) -> LayerInfo:
        return LayerInfo(name, block_of(name), *session.geometry[name])

    means = {name: split((s / store.counts[name]).cpu()) for name, s in store.sums.items()}
    per_step = {name: torch.stack([split(x) for x in store.steps[name]]).cpu()
                for name in store.sums if store.steps.get(name)}
    self_qk = {}
    for (step, name), (q, k) in session.self_qk.items():
        self_qk.setdefault(step, {})[name] = (q.cpu(), k.cpu())
    return AttentionResult(mode, list(images), prompt, negative, list(seeds), steps, tokenizer,
                           {name: info(name) for name in store.sums}, means, per_step or None, branches,
                           next(iter(means.values())).shape[2] if store.heads else None,
                           {name: info(name) for _, name in session.self_qk}, self_qk, settings, seconds=seconds)


class ResultCache:
    """The last few results, by key: the UI keeps only the key in its state."""

    def __init__(self, size: int = 6):
        self.size, self._items, self._lock = size, OrderedDict(), threading.Lock()
        self._ids = itertools.count(1)

    def put(self, result: AttentionResult) -> str:
        with self._lock:
            key = f"r{next(self._ids)}"
            self._items[key] = result
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return key

    def get(self, key: str | None) -> AttentionResult:
        with self._lock:
            if not key or key not in self._items:
                raise StudioError("no attention result to show: run a generation (or analyse an image) first")
            self._items.move_to_end(key)
            return self._items[key]
