"""A learned concept's UNet changes that act only on images whose prompt names its token (A1111's rule)."""
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
        raise StudioError(f"unknown scope {scope!r}: choose 'prompt' (prompts using its token) or 'always'")
    return scope


class PromptWords:
    """Where its words sit in each conditional row of the generation in progress (generations nest)."""

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
    def gate(self, batch: int) -> torch.Tensor | None:
        """(batch,) bool: the rows of images whose prompt uses one of the concept's tokens, or None."""
        if self.positions is None:
            return None
        uses = torch.tensor([any(word for word in row) for row in self.positions])
        return uses if batch == len(uses) else uses.repeat(2) if self.cfg and batch == 2 * len(uses) else None


class ScopedChange:
    """Forward hook: a layer's output plus the concept's change ((A, B) or (delta,)) on the scope's rows."""

    def __init__(self, scope: PromptScope, name: str, module: nn.Module, factors: tuple, strength: float):
        self.scope, self.strength, self.factors = scope, strength, factors
        self.conv = isinstance(module, nn.Conv2d)
        if not self.conv and not isinstance(module, nn.Linear):
            raise StudioError(f"{name}: a scoped concept changes only linear and conv layers: use scope 'always'")

    def fingerprint(self) -> str:
        return f"ScopedChange[{self.scope.signature}]"

    def change(self, module, x: torch.Tensor) -> torch.Tensor:
        f = [t.to(x.device, x.dtype) for t in self.factors]
        h = module._conv_forward(x, f[0], None) if self.conv else F.linear(x, f[0])
        return h if len(f) == 1 else (F.conv2d if self.conv else F.linear)(h, f[1])

    def __call__(self, module, args, out):
        gate = self.scope.gate(out.shape[0])
        if gate is None or not gate.any():
            return None
        rows = gate.nonzero()[:, 0].to(out.device)
        return out.index_add(0, rows, (self.change(module, args[0][rows]) * self.strength).to(out.dtype))


def install_scoped(pipe, params: dict, tensors: dict, changes: dict[str, tuple], strength: float, patch) -> None:
    tokens = [params["token"], *params.get("more_tokens", [])]
    scope, sites = PromptScope(pipe, tokens, edit_digest(params, tensors)), {}
    for name, factors in changes.items():
        module = module_slot(pipe, name)[2]
        sites[name] = (module, ScopedChange(scope, name, module, factors, strength))
    steering.install(patch, pipe, "layer", "scoped " + ", ".join(tokens), scope, sites)


def prompt_scopes(pipe) -> list[PromptScope]:
    return [s.obj for s in steering.slots(pipe, "layer") if isinstance(s.obj, PromptScope)]


@contextmanager
def only(scopes: list[PromptScope], keep: list[PromptScope]):
    """Inside the block, the concepts of `scopes` not in `keep` act on no image."""
    muted = [(s, s.positions) for s in scopes if s.positions is not None and all(s is not k for k in keep)]
    for s, rows in muted:
        s.positions = [[[] for _ in row] for row in rows]
    try:
        yield
    finally:
        for s, rows in muted:
            s.positions = rows
