"""Steering: the one way to alter a generation without changing weights, as named, typed slots.

Every such change (an inference-time guard, region masks, attention guidance, a scoped adapter, a collage
pass, attention capture) is a Slot installed through a Patch: undo removes it exactly, the fingerprint
sees it (each slot object may define `fingerprint()`), export can ask for it and the History lists it
(`describe`). The kinds, and what the object provides:

    condition  condition(cond, plan) -> Conditioning   prompt states before the denoiser reads them
    attention  wrap(site, attn, processor) -> processor an attention processor around the site's own
    layer      a forward hook (module, args, output)    on named layers: adapters, weight deltas
    model      wrap(forward) -> forward                 around the denoiser's forward: extra passes
    sampling   start(pipe, request, latents, tick) -> latents; step_end(pipe, i, t, kwargs) -> kwargs

Any slot object may also define `begin_generation(plan)` / `end_generation()`: called around each generation with its Plan
(prompts, images per prompt, guidance on or off, size), so it knows which batch rows hold which words.
Attention processors and forward hooks are diffusers' and torch's own seams; the denoiser's forward is
replaced only by a `model` slot. Slots for one job only (capture, guidance) go in a `temporary` patch.
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field

from .edits import Patch
from .errors import StudioError

KINDS = ("condition", "attention", "layer", "model", "sampling")


@dataclass(frozen=True)
class Slot:
    kind: str
    name: str
    obj: object
    sites: tuple[str, ...] = ()

    def signature(self) -> str:
        sig = getattr(self.obj, "fingerprint", None)
        return f"{self.kind}:{self.name}:{sig() if sig else type(self.obj).__qualname__}"


@dataclass
class Plan:
    """One generation as the steering sees it: `prompts` are the conditional rows' prompts (one per prompt,
    each drawn `images` times); with `cfg` the denoiser batch is [negative rows, conditional rows]."""

    prompts: list[str]
    images: int = 1
    cfg: bool = True
    height: int = 0
    width: int = 0
    negative: list[str] = field(default_factory=list)


def slots(pipe, kind: str | None = None) -> list[Slot]:
    return [s for s in getattr(pipe, "steering", ()) if kind is None or s.kind == kind]


def describe(pipe) -> list[str]:
    """What acts on a generation now, one line a slot (the History panel and `history` CLI show it)."""
    return [f"{s.kind} · {s.name}" + (f" · {len(s.sites)} site(s)" if s.sites else "") for s in slots(pipe)]


def install(patch: Patch, pipe, kind: str, name: str, obj, sites: dict | None = None) -> Slot:
    """Install `obj` as a slot of `kind` through `patch`. `sites`: for 'attention' the layers by processor
    name (see models' attention_sites), for 'layer' {layer name: (module, hook)}."""
    if kind not in KINDS:
        raise StudioError(f"unknown steering kind {kind!r}; known: {', '.join(KINDS)}")
    sites = sites or {}
    if kind == "attention":
        for site, attn in sites.items():
            patch.set_attr(attn, "processor", obj.wrap(site, attn, attn.processor))
    elif kind == "layer":
        for module, hook in sites.values():
            table = OrderedDict(module._forward_hooks)
            table[id(hook)] = hook
            patch.set_attr(module, "_forward_hooks", table)
    elif kind == "model":
        denoiser = sites["denoiser"]
        patch.set_attr(denoiser, "forward", obj.wrap(denoiser.forward))
        sites = {}
    slot = Slot(kind, name, obj, tuple(sites))
    patch.set_attr(pipe, "steering", (*slots(pipe), slot))
    return slot


@contextmanager
def temporary(pipe):
    """A patch for slots that act inside the block only (attention capture, guidance): undone on leaving."""
    patch = Patch(pipe)
    try:
        yield patch
    finally:
        patch.undo()


def condition(pipe, cond, plan: Plan):
    for s in slots(pipe, "condition"):
        cond = s.obj.condition(cond, plan)
    return cond


@contextmanager
def generation(pipe, plan: Plan):
    """Tell every slot a generation starts (begin_generation(plan)) and, whatever happens, that it ended."""
    started, objects = [], {id(s.obj): s.obj for s in slots(pipe)}
    try:
        for obj in objects.values():
            if hasattr(obj, "begin_generation"):
                obj.begin_generation(plan)
                started.append(obj)
        yield
    finally:
        for obj in reversed(started):
            if hasattr(obj, "end_generation"):
                obj.end_generation()


def start(pipe, request, latents, tick):
    for s in slots(pipe, "sampling"):
        latents = s.obj.start(pipe, request, latents, tick)
    return latents


def step_end(pipe, i, t, kwargs):
    for s in slots(pipe, "sampling"):
        kwargs = s.obj.step_end(pipe, i, t, kwargs)
    return kwargs
