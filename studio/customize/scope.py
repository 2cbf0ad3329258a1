"""A learned concept that acts only where asked: its UNet weight changes join the images whose prompt names its
token (A1111's rule for a LoRA called from the prompt). Merged into the weights, a heart LoRA turned the toy
model's circles into hearts; scoped, a prompt without the token gives the base model's image bit for bit.

The change rides as a forward hook on each changed layer (out += gate * strength * ΔW x), a 'layer' steering slot
(undo restores the hook tables exactly). The gate is per image: masking it to the token's region of a region
composition never raised the two-concept rate on the toy model (8/16 -> 4/16, 2/16 -> 2/16 images).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import models, steering
from ..edits import module_slot
from ..errors import StudioError
from ..fingerprint import edit_digest
from ..tokenizer import prompt_ids, token_positions

SCOPES = {"prompt": "prompts that use its token", "always": "every prompt (merged into the weights)"}


def check_scope(scope) -> str:
    if scope not in SCOPES:
        raise StudioError(f"unknown scope {scope!r}: choose 'prompt' (the concept acts on prompts that use its "
                          "token) or 'always' (merged into the weights)")
    return scope


class PromptWords:
    """What each steering object of this package knows of the generation in progress (begin_generation): per
    conditional row, where each of its words sits; the batch layout ([negative, prompt] under guidance),
    the latent size and the denoising passes so far. Generations nest (a collage draws each region in
    one of its own): when one ends, the state of the one around it comes back."""

    def __init__(self, pipe, words: list[str], signature: str):
        self.pipe, self.words, self.signature = pipe, words, signature
        self.positions: list[list[list[int]]] | None = None  # row -> word -> token positions ([]: absent)
        self.lengths: list[int] = []  # row -> tokens up to and with EOS
        self.cfg, self.latent_hw, self.passes = False, None, 0
        self.outer: list[tuple] = []

    def fingerprint(self) -> str:
        return f"{type(self).__name__}[{self.signature}]"

    def begin_generation(self, plan: steering.Plan) -> None:
        self.outer.append((self.positions, self.lengths, self.cfg, self.latent_hw, self.passes))
        model, rows, lengths = models.of(self.pipe), [], []
        for p in map(model.spelled, plan.prompts):
            rows += [[self.find(p, model.spelled(w)) for w in self.words]] * plan.images
            lengths += [len(prompt_ids(self.pipe.tokenizer, p))] * plan.images
        self.positions, self.lengths, self.cfg, self.passes = rows, lengths, bool(plan.cfg), 0
        self.latent_hw = model.latent_shape(plan.height, plan.width)[1:] if plan.height and plan.width else None

    def end_generation(self) -> None:  # later direct UNet calls (training) are no generation's
        self.positions, self.lengths, self.cfg, self.latent_hw, self.passes = self.outer.pop()

    def find(self, prompt: str, word: str) -> list[int]:
        try:
            return token_positions(self.pipe.tokenizer, prompt, word)
        except StudioError:
            return []  # the word is not in this prompt: nothing to steer for it


class PromptScope(PromptWords):
    """Which rows of the UNet batch belong to images whose prompt uses one of the concept's tokens."""

    def gate(self, batch: int) -> torch.Tensor | None:
        """(batch,) bool: the rows the concept acts on (negative and conditional rows alike), or None."""
        if self.positions is None:
            return None
        uses = torch.tensor([any(word for word in row) for row in self.positions])
        if batch == len(uses):
            return uses
        return uses.repeat(2) if self.cfg and batch == 2 * len(uses) else None


class ScopedChange:
    """Forward hook: a layer's output plus the concept's change of its weight, on the rows the scope allows.
    `factors` is (A, B) of a LoRA or (delta,) of a full change."""

    def __init__(self, scope: PromptScope, name: str, module: nn.Module, factors: tuple, strength: float):
        self.scope, self.strength, self.factors = scope, strength, factors
        self.conv = isinstance(module, nn.Conv2d)
        if not self.conv and not isinstance(module, nn.Linear):
            raise StudioError(f"{name}: a scoped concept can change linear and conv layers only, not "
                              f"{type(module).__name__}; apply it with scope 'always'")

    def fingerprint(self) -> str:
        return f"ScopedChange[{self.scope.signature}]"

    def change(self, module, x: torch.Tensor) -> torch.Tensor:
        f = [t.to(x.device, x.dtype) for t in self.factors]
        if self.conv:
            h = module._conv_forward(x, f[0], None)
            return F.conv2d(h, f[1]) if len(f) == 2 else h
        return F.linear(F.linear(x, f[0]), f[1]) if len(f) == 2 else F.linear(x, f[0])

    def __call__(self, module, args, out):
        gate = self.scope.gate(out.shape[0])
        if gate is None or not gate.any():
            return None
        rows = gate.nonzero()[:, 0].to(out.device)
        delta = self.change(module, args[0][rows]) * self.strength
        return out.index_add(0, rows, delta.to(out.dtype))


def install_scoped(pipe, params: dict, tensors: dict, changes: dict[str, tuple], strength: float, patch) -> None:
    """Hook each changed UNet layer (`changes`: weight name -> factors) behind one prompt scope."""
    tokens = [params["token"], *params.get("more_tokens", [])]
    scope, sites = PromptScope(pipe, tokens, edit_digest(params, tensors)), {}
    for name, factors in changes.items():
        module = module_slot(pipe, name)[2]
        sites[name] = (module, ScopedChange(scope, name, module, factors, strength))
    steering.install(patch, pipe, "layer", "scoped " + ", ".join(tokens), scope, sites)


def prompt_scopes(pipe) -> list[PromptScope]:
    """The scopes of the concepts applied now, one per concept, in the order they were applied."""
    return [s.obj for s in steering.slots(pipe, "layer") if isinstance(s.obj, PromptScope)]


@contextmanager
def only(scopes: list[PromptScope], keep: list[PromptScope]):
    """Inside the block, the concepts of `scopes` not in `keep` act on no image (as if unnamed)."""
    muted = [(s, s.positions) for s in scopes if s.positions is not None and all(s is not k for k in keep)]
    for s, rows in muted:
        s.positions = [[[] for _ in row] for row in rows]
    try:
        yield
    finally:
        for s, rows in muted:
            s.positions = rows
