"""Test-time attention control: Attend-and-Excite, A-STAR, and prompt-to-prompt reweighting.

Attend-and-Excite and A-STAR share one loop (`AttentionGuidance`): before a denoising step, run
the UNet once on the conditional prompt with gradients on the latent, read the cross-attention
maps at one resolution (16x16 published), compute a loss, and step the latent against its
gradient. The losses are small pure functions of the maps:
- Attend-and-Excite: drop SOS/EOS, softmax(x100) over the words, Gaussian-smooth; the loss is
  1 - (peak of the weakest subject word); iterative refinement at the threshold steps.
- A-STAR: segregation (overlap between different subjects' maps) plus retention (a subject's
  map should keep the mask it had at the previous step).
Reweighting scales chosen tokens' attention probabilities (no gradients): P diag(w) V is
computed exactly as SDPA(Q, K, diag(w) V), so the fused kernel stays (captured maps show the
softmax before the weights).

The guidance runs inside diffusers' own loop: the latent of step j is updated in
callback_on_step_end of step j-1 (and before sampling for step 0), so any sampler works.
Published defaults (Attend-and-Excite, for 50 steps): scale_factor 20, thresholds {0: .05, 10: .5,
20: .8}, max_iter_to_alter 25, 20 refinement steps, step size scale_factor * sqrt(linspace(1, .5)).
They are step indices of a 50-step schedule: a run of n steps alters the first 25n/50 steps and
refines at steps 10n/50 and 20n/50 (`schedule_steps=None` takes them as this run's indices).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..errors import StudioError
from .any_image import encoded
from .capture import project_qk
from .tokens import prompt_ids, token_positions

METHODS = ("none", "attend-excite", "a-star")
STANDARD_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


# -- losses: pure functions of the maps ------------------------------------------------------------
def gaussian_smooth(maps: torch.Tensor, kernel: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """(..., h, w) smoothed with a normalized Gaussian, reflect-padded (Attend-and-Excite's smoothing)."""
    x = torch.arange(kernel, dtype=maps.dtype, device=maps.device) - (kernel - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(g, g)
    k2 = (k2 / k2.sum())[None, None]
    shape = maps.shape
    flat = maps.reshape(-1, 1, *shape[-2:])
    pad = kernel // 2
    return F.conv2d(F.pad(flat, (pad,) * 4, mode="reflect"), k2).reshape(shape)


def subject_maps(maps: torch.Tensor, subjects: list[list[int]], eos: int, smooth=(3, 0.5)) -> torch.Tensor:
    """maps (B, h, w, T) -> (B, K, h, w): SOS/EOS dropped, softmax(x100) over the words, smoothed."""
    text = (maps[..., 1:eos] * 100).softmax(-1)
    out = torch.stack([text[..., [p - 1 for p in pos]].mean(-1) for pos in subjects], 1)
    return gaussian_smooth(out, *smooth)


def excite_loss(sm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attend-and-Excite: per image, 1 - the peak of the weakest subject (>= 0); also the peaks (B, K)."""
    peaks = sm.amax((-2, -1))
    return (1 - peaks).clamp_min(0).amax(1), peaks


def _unit(sm: torch.Tensor) -> torch.Tensor:
    return sm / sm.amax((-2, -1), keepdim=True).clamp_min(1e-8)


def segregation_loss(sm: torch.Tensor) -> torch.Tensor:
    """A-STAR: sum over subject pairs of sum(min(a, b)) / sum(a + b), maps scaled to peak 1: (B,)."""
    a = _unit(sm)
    pairs = list(combinations(range(sm.shape[1]), 2))
    if not pairs:
        return sm.new_zeros(sm.shape[0])
    return sum(torch.minimum(a[:, i], a[:, j]).sum((-2, -1)) / (a[:, i] + a[:, j]).sum((-2, -1)).clamp_min(1e-8)
               for i, j in pairs)


def retention_loss(sm: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """A-STAR: sum over subjects of 1 - soft IoU(map now, its binarized mask at the previous step): (B,)."""
    if previous is None:
        return sm.new_zeros(sm.shape[0])
    a, m = _unit(sm), previous.to(sm.dtype)
    inter = (a * m).sum((-2, -1))
    union = (a + m - a * m).sum((-2, -1)).clamp_min(1e-8)
    return (1 - inter / union).sum(1)


# -- the guidance loop ------------------------------------------------------------------------------
@dataclass
class Control:
    """What to do at test time: a guidance method on subject words, and/or token reweighting."""
    method: str = "none"
    words: list[str] = field(default_factory=list)
    scale_factor: float = 20.0
    thresholds: dict[int, float] = field(default_factory=lambda: {0: 0.05, 10: 0.5, 20: 0.8})
    max_iter_to_alter: int = 25
    max_refinement_steps: int = 20
    schedule_steps: int | None = 50  # the step count thresholds and max_iter_to_alter are given for
    resolution: int = 16
    scale_range: tuple[float, float] = (1.0, 0.5)
    smooth: tuple[int, float] = (3, 0.5)
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
            weights = {}
            for word, factor in self.reweight.items():
                for p in token_positions(tokenizer, prompt, word):
                    weights[p] = float(factor)
            out.append(Reweight(weights))
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
    """Attend-and-Excite's 16x16 on SD-sized models (latent >= 32); on small ones (the toy model, latent
    16) the second-finest level, where their cross-attention localizes words (their finest maps are flat)."""
    if 16 in resolutions and resolutions[0] >= 32:
        return 16
    return resolutions[1] if len(resolutions) > 1 else resolutions[0]


def default_scale_factor(latent_side: int) -> float:
    """The published 20 on SD-sized models; 2 on small ones: on the toy model (latent 16) a step of 20
    at its 8x8 maps breaks more images than it rescues (bench/bench_attention.py --what control)."""
    return 20.0 if latent_side >= 32 else 2.0


def parse_thresholds(text: str) -> dict[int, float]:
    """'0:0.05, 10:0.5, 20:0.8' -> {0: 0.05, 10: 0.5, 20: 0.8}."""
    out = {}
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        step, sep, value = part.partition(":")
        try:
            out[int(step)] = float(value)
        except ValueError:
            raise StudioError(f"thresholds look like '0:0.05, 10:0.5, 20:0.8' (got {part.strip()!r})") from None
        if not sep or not 0 <= out[int(step)] <= 1:
            raise StudioError(f"a threshold is step:value with value from 0 to 1 (got {part.strip()!r})")
    return out


def parse_weights(text: str) -> dict[str, float]:
    """'circle=2, red=0.5' -> {'circle': 2.0, 'red': 0.5}."""
    out = {}
    for part in str(text or "").split(","):
        if not part.strip():
            continue
        word, sep, value = part.rpartition("=")
        try:
            if not sep or not word.strip():
                raise ValueError
            out[word.strip()] = float(value)
        except ValueError:
            raise StudioError(f"reweighting looks like 'circle=2, red=0.5' (got {part.strip()!r})") from None
    return out


class AttentionGuidance:
    """A session plugin: updates the latent before each of the first steps (see the module docstring)."""

    def __init__(self, control: Control, subjects: list[list[int]], eos: int, check_stop=lambda: None):
        self.c, self.subjects, self.eos, self.check_stop = control, subjects, eos, check_stop
        self.log: list[dict] = []
        self.previous = None  # A-STAR: subject masks at the previous step

    def bind(self, session) -> None:
        self.session = session

    def _active(self, j: int) -> bool:
        return j < self.alter or (self.c.method == "attend-excite" and j in self.thresholds)

    def start(self, pipe, request, latents):
        self.model, self.log, self.previous = models.of(pipe), [], None
        self.cond = encoded(self.model, [request.prompt], request.batch)
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(request.steps, device=pipe.device)
        self.n_steps = len(scheduler.timesteps)
        self.schedule = np.linspace(*self.c.scale_range, self.n_steps)
        ratio = self.n_steps / self.c.schedule_steps if self.c.schedule_steps else 1.0
        self.alter = round(self.c.max_iter_to_alter * ratio)
        self.thresholds = {round(k * ratio): v for k, v in self.c.thresholds.items()}
        h, w = latents.shape[-2:]
        sizes = {}
        for _ in range(8):
            sizes[h] = h * w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if self.c.resolution not in sizes:
            raise StudioError(f"no attention resolution {self.c.resolution} in this model at this image size "
                              f"(it has {', '.join(map(str, sorted(sizes, reverse=True)))})")
        self.session.guide_layers = {sizes[self.c.resolution]}
        if not self._active(0):
            return latents
        t0, sigma = scheduler.timesteps[0], scheduler.init_noise_sigma
        x = latents.to(pipe.device, self.model.denoiser.dtype) * sigma
        x = self.update(0, t0, x, lambda z: scheduler.scale_model_input(z, t0))
        return (x / sigma).to(latents.dtype)

    def step_end(self, pipe, i, t, kwargs):
        j = i + 1
        if j < self.n_steps and self._active(j):
            t_next = pipe.scheduler.timesteps[j]
            kwargs["latents"] = self.update(j, t_next, kwargs["latents"],
                                            lambda z: pipe.scheduler.scale_model_input(z, t_next))
        return kwargs

    def losses(self, x, t, scale_in):
        """One conditional UNet pass; per-image loss (B,) and the subject maps (B, K, h, w)."""
        s = self.session
        s.mode, s.guide_maps = "guide", {}
        try:
            self.model.predict(scale_in(x), t, self.cond)
        finally:
            s.mode = "sample"
        if not s.guide_maps:
            raise StudioError(f"the model has no cross-attention layer at {self.c.resolution}x{self.c.resolution}")
        names = list(s.guide_maps)
        h, w = s.geometry[names[0]]
        maps = torch.stack([s.guide_maps[n] for n in names]).mean(0)  # (B, N, T)
        maps = maps.reshape(maps.shape[0], h, w, maps.shape[-1])
        sm = subject_maps(maps, self.subjects, self.eos, self.c.smooth)
        if self.c.method == "attend-excite":
            loss, _ = excite_loss(sm)
        else:
            loss = (self.c.segregation_weight * segregation_loss(sm)
                    + self.c.retention_weight * retention_loss(sm, self.previous))
        return loss, sm

    def update(self, j: int, t, x: torch.Tensor, scale_in) -> torch.Tensor:
        step = self.c.scale_factor * math.sqrt(self.schedule[j])
        refined = 0
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            loss, sm = self.losses(x, t, scale_in)
            if self.c.method == "attend-excite" and j in self.thresholds:
                target = 1.0 - self.thresholds[j]
                while bool((loss > target).any()) and refined < self.c.max_refinement_steps:
                    self.check_stop()
                    x = _descend(x, loss * (loss > target), step)
                    loss, sm = self.losses(x, t, scale_in)
                    refined += 1
            if j < self.alter:
                x = _descend(x, loss, step)
        peaks = sm.detach().amax((-2, -1))
        self.log.append(dict(step=j, loss=[float(v) for v in loss.detach()], refinement_steps=refined,
                             peaks=peaks.float().cpu().tolist()))
        unit = _unit(sm.detach())
        self.previous = unit >= self.c.retention_tau
        return x.detach()


def _descend(x: torch.Tensor, loss: torch.Tensor, step: float) -> torch.Tensor:
    """x - step * d(sum loss)/dx, on the latent only (the model's parameters get no gradient)."""
    if loss.requires_grad and float(loss.detach().abs().sum()) > 0:
        (grad,) = torch.autograd.grad(loss.sum(), [x])
        x = x - step * grad
    return x.detach().requires_grad_(True)


# -- prompt-to-prompt reweighting ------------------------------------------------------------------
class Reweight:
    """A session plugin scaling chosen token positions' attention probabilities in the prompt rows."""

    def __init__(self, weights: dict[int, float]):
        self.weights = weights

    def bind(self, session) -> None:
        self.session = session

    def wrap(self, name: str, proc):
        if type(proc).__name__ not in STANDARD_PROCESSORS:
            raise StudioError(f"reweighting needs diffusers' standard attention processor; {name} uses "
                              f"{type(proc).__name__} (installed by an edit or adapter): undo it first")
        return ReweightProcessor(proc, self)


class ReweightProcessor:
    """softmax(QK^T) diag(w) V as SDPA(Q, K, diag(w) V): the prompt rows only, the fused kernel kept."""

    def __init__(self, base, plugin: Reweight):
        self.base, self.plugin = base, plugin

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (encoder_hidden_states is None or hidden_states.ndim != 3 or attention_mask is not None
                or attn.group_norm is not None or attn.spatial_norm is not None):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        q, k = project_qk(attn, hidden_states, encoder_hidden_states)
        context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        b, heads, _, d = q.shape
        v = attn.to_v(context).view(b, -1, heads, d).transpose(1, 2)
        w = torch.ones(b, 1, v.shape[2], 1, dtype=v.dtype, device=v.device)
        session = self.plugin.session
        rows = slice(None) if session.mode == "guide" else session.cond_rows(b)
        for pos, factor in self.plugin.weights.items():
            if pos < v.shape[2]:
                w[rows, :, pos] = factor
        out = F.scaled_dot_product_attention(q, k, v * w, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor
