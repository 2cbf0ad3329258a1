"""The one way to alter a generation without changing weights: typed slots installed through a Patch (so undo,
fingerprint, export and History see them). Each provides, and may add begin_generation(plan)/end_generation():
    condition  condition(cond, plan) -> Conditioning   prompt states before the denoiser reads them
    attention  wrap(site, attn, processor) -> processor around the site's own attention processor
    layer      a forward hook (module, args, output)    on named layers: adapters, weight deltas
    model      wrap(forward) -> forward                 around the denoiser's forward: extra passes
    sampling   start(pipe, request, latents, tick) -> latents; step_end(pipe, i, t, kwargs) -> kwargs
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack, contextmanager
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
    """One generation: the conditional rows' prompts, each drawn `images` times (after the negative rows with cfg)."""

    prompts: list[str]
    images: int = 1
    cfg: bool = True
    height: int = 0
    width: int = 0
    negative: list[str] = field(default_factory=list)


def slots(pipe, kind: str | None = None) -> list[Slot]:
    return [s for s in getattr(pipe, "steering", ()) if kind is None or s.kind == kind]


def describe(pipe) -> list[str]:
    return [f"{s.kind} · {s.name}" + (f" · {len(s.sites)} site(s)" if s.sites else "") for s in slots(pipe)]


def install(patch: Patch, pipe, kind: str, name: str, obj, sites: dict | None = None) -> Slot:
    """`obj` as a slot of `kind`; `sites`: 'attention' {processor name: layer}, 'layer' {name: (module, hook)}."""
    if kind not in KINDS:
        raise StudioError(f"unknown steering kind {kind!r}; known: {', '.join(KINDS)}")
    sites = sites or {}
    if kind == "attention":
        for site, attn in sites.items():
            patch.set_attr(attn, "processor", obj.wrap(site, attn, attn.processor))
    elif kind == "layer":
        for module, hook in sites.values():
            patch.set_attr(module, "_forward_hooks", OrderedDict({**module._forward_hooks, id(hook): hook}))
    elif kind == "model":
        denoiser = sites["denoiser"]
        patch.set_attr(denoiser, "forward", obj.wrap(denoiser.forward))
        sites = {}
    slot = Slot(kind, name, obj, tuple(sites))
    patch.set_attr(pipe, "steering", (*slots(pipe), slot))
    return slot


@contextmanager
def temporary(pipe):
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
    with ExitStack() as ended:  # whatever happens, the slots that began are told, in reverse
        for obj in {id(s.obj): s.obj for s in slots(pipe)}.values():
            if hasattr(obj, "begin_generation"):
                obj.begin_generation(plan)
                ended.callback(getattr(obj, "end_generation", lambda: None))
        yield


def start(pipe, request, latents, tick):
    for s in slots(pipe, "sampling"):
        latents = s.obj.start(pipe, request, latents, tick)
    return latents


def step_end(pipe, i, t, kwargs):
    for s in slots(pipe, "sampling"):
        kwargs = s.obj.step_end(pipe, i, t, kwargs)
    return kwargs
