"""A learned concept that acts only where it is asked for: its UNet weight changes join the images whose
prompt names its token (A1111's rule for a LoRA called from the prompt).

A concept merged into the weights changes every prompt: on the toy model a heart LoRA turned circles into
hearts. Scoped, a prompt without the token gives the base model's image bit for bit.

The change rides as a forward hook on each changed layer (out += gate * strength * ΔW x), added by
swapping the layer's hook table through the patch, so undo restores the exact original table and the
weights are never touched; the hook reports itself to the model fingerprint. (Masking the change to the
token's region of a region composition was tried twice and never raised the two-concept rate on the toy
model: 8/16 -> 4/16 images with both shapes for one pair of concepts, 2/16 -> 2/16 for another; so the
gate is per image.)
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StudioError
from .compose import Steering, _signature, module_slot

SCOPES = {"prompt": "prompts that use its token", "always": "every prompt (merged into the weights)"}


def check_scope(scope) -> str:
    if scope not in SCOPES:
        raise StudioError(f"unknown scope {scope!r}: choose 'prompt' (the concept acts on prompts that use its "
                          "token) or 'always' (merged into the weights)")
    return scope


class PromptScope(Steering):
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
    scope = PromptScope(pipe, tokens, 1.0, _signature(params, tensors))
    scope.install(patch, processors=False)
    for name, factors in changes.items():
        _, _, module = module_slot(pipe, name)
        hook = ScopedChange(scope, name, module, factors, strength)
        table = OrderedDict(module._forward_hooks)
        table[id(hook)] = hook
        patch.set_attr(module, "_forward_hooks", table)


def prompt_scopes(pipe) -> list[PromptScope]:
    """The scopes of the concepts applied now, one per concept, in layer order."""
    found = {}
    for module in pipe.unet.modules():
        for hook in module._forward_hooks.values():
            if isinstance(hook, ScopedChange):
                found.setdefault(id(hook.scope), hook.scope)
    return list(found.values())


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
