"""Test-time attention control: Attend-and-Excite and A-STAR (one loop: the latent descends a loss of the
subjects' maps, updated in the previous step's callback so any sampler works), and prompt-to-prompt reweighting.
Step defaults are those of the published 50-step schedule, scaled to this run's."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from itertools import combinations

import numpy as np
import torch

from .. import models
from ..capture import STANDARD_PROCESSORS, encoded, gaussian_smooth, levels
from ..errors import StudioError
from ..tokenizer import prompt_ids, token_positions
from .maps import normalize

METHODS = ("none", "attend-excite", "a-star")


def subject_maps(maps: torch.Tensor, subjects: list[list[int]], eos: int, smooth=(3, 0.5)) -> torch.Tensor:
    """(B, h, w, T) -> (B, K, h, w): SOS/EOS dropped, softmax(x100) over the words, smoothed."""
    text = (maps[..., 1:eos] * 100).softmax(-1)
    out = torch.stack([text[..., [p - 1 for p in pos]].mean(-1) for pos in subjects], 1)
    return gaussian_smooth(out, *smooth)


def excite_loss(sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, 1 - the weakest subject's peak (>= 0); and the peaks (B, K)."""
    peaks = sm.amax((-2, -1))
    return (1 - peaks).clamp_min(0).amax(1), peaks


def segregation_loss(sm: torch.Tensor) -> torch.Tensor:
    """A-STAR: sum over subject pairs of their `maps.overlap`, maps at peak 1: (B,)."""
    a = normalize(sm)
    return sum((torch.minimum(a[:, i], a[:, j]).sum((-2, -1)) / (a[:, i] + a[:, j]).sum((-2, -1)).clamp_min(1e-8)
                for i, j in combinations(range(sm.shape[1]), 2)), sm.new_zeros(sm.shape[0]))


def retention_loss(sm: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """A-STAR: sum over subjects of 1 - soft IoU(map, its previous step's mask): (B,)."""
    if previous is None:
        return sm.new_zeros(sm.shape[0])
    a, m = normalize(sm), previous.to(sm.dtype)
    inter = (a * m).sum((-2, -1))
    union = (a + m - a * m).sum((-2, -1)).clamp_min(1e-8)
    return (1 - inter / union).sum(1)


@dataclass
class Control:
    """A guidance method on subject words, and/or token reweighting."""
    method: str = "none"
    words: list[str] = field(default_factory=list)
    scale_factor: float = 20.0
    thresholds: dict[int, float] = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    max_iter_to_alter: int = 25
    max_refinement_steps: int = 20
    schedule_steps: int | None = 50  # the steps that thresholds and max_iter_to_alter count in
    resolution: int = 16
    retention_tau: float = 0.5
    segregation_weight: float = 1.0
    retention_weight: float = 1.0
    reweight: dict[str, float] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return self.method != "none" or bool(self.reweight)

    def plugins(self, tokenizer, prompt: str, check_stop=lambda: None) -> list:
        """The session plugins for this prompt; raises StudioError on bad settings."""
        if self.method not in METHODS:
            raise StudioError(f"unknown guidance method {self.method!r}; choose one of {', '.join(METHODS)}")
        out = []
        if self.method != "none":
            words = [w.strip() for w in self.words if w and w.strip()]
            if not words:
                raise StudioError(f"{self.method} needs subject words: name the objects that should appear")
            if self.method == "a-star" and len(words) < 2:
                raise StudioError("A-STAR separates subjects: name at least two subject words")
            if self.scale_factor < 0 or self.max_iter_to_alter < 0:
                raise StudioError("scale factor and steps to alter must not be negative")
            subjects = [token_positions(tokenizer, prompt, w) for w in words]
            out.append(AttentionGuidance(self, subjects, len(prompt_ids(tokenizer, prompt)) - 1, check_stop))
        if self.reweight:
            out.append(Reweight({p: float(factor) for word, factor in self.reweight.items()
                                 for p in token_positions(tokenizer, prompt, word)}))
        return out

    def describe(self) -> dict:
        d = {"method": self.method}
        if self.method != "none":
            d.update(words=list(self.words), scale_factor=self.scale_factor, resolution=self.resolution,
                     max_iter_to_alter=self.max_iter_to_alter, schedule_steps=self.schedule_steps)
            if self.method == "attend-excite":
                d.update(thresholds={str(k): v for k, v in self.thresholds.items()},
                         max_refinement_steps=self.max_refinement_steps)
            else:
                d.update(retention_tau=self.retention_tau, segregation_weight=self.segregation_weight,
                         retention_weight=self.retention_weight)
        if self.reweight:
            d["reweight"] = dict(self.reweight)
        return d


def default_resolution(resolutions: list[int]) -> int:
    """16 on SD-sized models; on small ones the second-finest level (the finest maps are flat)."""
    if 16 in resolutions and resolutions[0] >= 32:
        return 16
    return resolutions[1] if len(resolutions) > 1 else resolutions[0]


def default_scale_factor(latent_side: int) -> float:
    """20 on SD-sized models; 2 on small ones (20 breaks more images than it rescues)."""
    return 20.0 if latent_side >= 32 else 2.0


def _pairs(text: str, sep: str, key, example: str):
    """(key(k), float(v), part) for each 'k<sep>v' part of a comma-separated text."""
    for part in filter(None, (p.strip() for p in str(text or "").split(","))):
        k, found, value = part.rpartition(sep)
        try:
            if not found or not k.strip():
                raise ValueError
            yield key(k), float(value), part
        except ValueError:
            raise StudioError(f"{example} (got {part!r})") from None


def parse_thresholds(text: str) -> dict[int, float]:
    """'0:0.05, 10:0.5, 20:0.8' -> {0: 0.05, 10: 0.5, 20: 0.8}."""
    out = {}
    for step, value, part in _pairs(text, ":", int, "thresholds look like '0:0.05, 10:0.5, 20:0.8'"):
        if not 0 <= value <= 1:
            raise StudioError(f"a threshold is step:value with value from 0 to 1 (got {part!r})")
        out[step] = value
    return out


def parse_weights(text: str) -> dict[str, float]:
    """'circle=2, red=0.5' -> {'circle': 2.0, 'red': 0.5}."""
    example = "reweighting looks like 'circle=2, red=0.5'"
    return {word: value for word, value, _ in _pairs(text, "=", str.strip, example)}


class AttentionGuidance:
    """A session plugin: updates the latent before each of the first steps."""

    def __init__(self, control: Control, subjects: list[list[int]], eos: int, check_stop=lambda: None):
        self.c, self.subjects, self.eos, self.check_stop = control, subjects, eos, check_stop
        self.log: list[dict] = []

    def _active(self, j: int) -> bool:
        return j < self.alter or (self.c.method == "attend-excite" and j in self.thresholds)

    def start(self, pipe, request, latents):
        self.model, self.log, self.previous = models.of(pipe), [], None  # previous: last masks
        self.cond = encoded(self.model, [request.prompt], request.batch)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(request.steps, device=pipe.device)
        self.n_steps = len(scheduler.timesteps)
        self.schedule = np.linspace(1.0, 0.5, self.n_steps)  # step size: scale_factor * sqrt(this)
        ratio = self.n_steps / self.c.schedule_steps if self.c.schedule_steps else 1.0
        self.alter = round(self.c.max_iter_to_alter * ratio)
        self.thresholds = {round(k * ratio): v for k, v in self.c.thresholds.items()}
        sizes = {h: h * w for h, w in levels(latents.shape[-2:])}
        if self.c.resolution not in sizes:
            raise StudioError(f"no attention resolution {self.c.resolution} in this model at this image size "
                              f"(it has {', '.join(map(str, sorted(sizes, reverse=True)))})")
        self.session.guide_layers = {sizes[self.c.resolution]}
        if not self._active(0):
            return latents
        sigma = scheduler.init_noise_sigma
        x = self.update(0, scheduler, latents.to(pipe.device, self.model.denoiser.dtype) * sigma)
        return (x / sigma).to(latents.dtype)

    def step_end(self, pipe, i, t, kwargs):
        if i + 1 < self.n_steps and self._active(i + 1):
            kwargs["latents"] = self.update(i + 1, pipe.scheduler, kwargs["latents"])
        return kwargs

    def losses(self, x, t, scheduler):
        """One conditional UNet pass; per-image loss (B,) and the subject maps (B, K, h, w)."""
        s = self.session
        s.mode, s.guide_maps = "guide", {}
        try:
            self.model.predict(scheduler.scale_model_input(x, t), t, self.cond)
        finally:
            s.mode = "sample"
        if not s.guide_maps:
            raise StudioError(f"the model has no cross-attention layer at {self.c.resolution}x{self.c.resolution}")
        h, w = s.geometry[next(iter(s.guide_maps))]
        maps = torch.stack(list(s.guide_maps.values())).mean(0)  # (B, N, T)
        sm = subject_maps(maps.unflatten(1, (h, w)), self.subjects, self.eos)
        if self.c.method == "attend-excite":
            return excite_loss(sm)[0], sm
        return (self.c.segregation_weight * segregation_loss(sm)
                + self.c.retention_weight * retention_loss(sm, self.previous)), sm

    def update(self, j: int, scheduler, x: torch.Tensor) -> torch.Tensor:
        """Step j's latent after guidance (and refinement at a threshold step)."""
        t, step, refined = scheduler.timesteps[j], self.c.scale_factor * math.sqrt(self.schedule[j]), 0
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss, sm = self.losses(x, t, scheduler)
            if self.c.method == "attend-excite" and j in self.thresholds:
                target = 1.0 - self.thresholds[j]
                while bool((loss > target).any()) and refined < self.c.max_refinement_steps:
                    self.check_stop()
                    x = _descend(x, loss * (loss > target), step)
                    loss, sm = self.losses(x, t, scheduler)
                    refined += 1
            if j < self.alter:
                x = _descend(x, loss, step)
        sm = sm.detach()
        self.log.append(dict(step=j, loss=[float(v) for v in loss.detach()], refinement_steps=refined,
                             peaks=sm.amax((-2, -1)).float().cpu().tolist()))
        self.previous = normalize(sm) >= self.c.retention_tau
        return x.detach()


def _descend(x: torch.Tensor, loss: torch.Tensor, step: float) -> torch.Tensor:
    """x - step * d(sum loss)/dx, on the latent only."""
    if loss.requires_grad and float(loss.detach().abs().sum()) > 0:
        (grad,) = torch.autograd.grad(loss.sum(), [x])
        x = x - step * grad
    return x.detach().requires_grad_(True)


class Reweight:
    """A session plugin: scales chosen tokens' attention in the prompt rows (captured maps stay unscaled)."""

    def __init__(self, weights: dict[int, float]):
        self.weights = weights

    def wrap(self, name: str, proc):
        if type(proc).__name__ not in STANDARD_PROCESSORS:
            raise StudioError(f"reweighting needs diffusers' standard attention processor; {name} uses "
                              f"{type(proc).__name__} (installed by an edit or adapter): undo it first")
        return partial(self.attend, proc)

    def attend(self, base, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        """`base` on per-token scaled values: P diag(w) V as SDPA(Q, K, diag(w) V), still fused."""
        if (encoder_hidden_states is None or hidden_states.ndim != 3 or attention_mask is not None
                or attn.group_norm is not None or attn.spatial_norm is not None):
            return base(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        rows = slice(None) if self.session.mode == "guide" else self.session.cond_rows(hidden_states.shape[0])

        def scale(module, inputs, v):
            w = torch.ones_like(v[..., :1])
            for pos, factor in self.weights.items():
                if pos < v.shape[1]:
                    w[rows, pos] = factor
            return v * w

        hook = attn.to_v.register_forward_hook(scale)
        try:
            return base(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        finally:
            hook.remove()
