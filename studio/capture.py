"""Attention capture with images bit-identical; self-attention keeps Q/K, as N x N per layer and step won't fit."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from . import models, steering
from .checks import whole
from .errors import StudioError
from .images import to_tensor

STANDARD_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")  # diffusers' SDPA: what project_qk reproduces


def project_qk(attn, hidden_states: torch.Tensor, context: torch.Tensor | None = None):
    """Head-split Q (B, H, N, d) and K (B, H, M, d), as AttnProcessor2_0 forms them."""
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    k = attn.to_k(context).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    return q if attn.norm_q is None else attn.norm_q(q), k if attn.norm_k is None else attn.norm_k(k)


def attention_probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.matmul(q * attn.scale, k.transpose(-1, -2)).float().softmax(-1)


def gaussian_smooth(maps: torch.Tensor, kernel: int = 3, sigma: float = 0.5) -> torch.Tensor:
    x = torch.arange(kernel, dtype=maps.dtype, device=maps.device) - (kernel - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    k2 = torch.outer(g, g)
    flat = F.pad(maps.reshape(-1, 1, *maps.shape[-2:]), (kernel // 2,) * 4, mode="reflect")
    return F.conv2d(flat, (k2 / k2.sum())[None, None]).reshape(maps.shape)


def levels(latent_hw) -> list[tuple[int, int]]:
    h, w = latent_hw
    return [(math.ceil(h / 2 ** k), math.ceil(w / 2 ** k)) for k in range(8)]


def grid_shape(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) of a layer with n queries: the level of that size, else a square."""
    for h, w in levels(latent_hw) if latent_hw is not None else ():
        if h * w == n:
            return h, w
    side = int(round(n ** 0.5))
    if side * side != n:
        raise StudioError(f"cannot tell the shape of an attention layer with {n} positions")
    return side, side


class CrossAttentionStore:
    """Per layer, summed maps (rows, [H,] N, T) and with `per_step` the head means per step."""

    step_dtype = torch.float16  # per-step maps: half the memory of fp32

    def __init__(self, negative: bool = False, heads: bool = False, per_step: bool = False, tokens: int | None = None):
        self.negative, self.heads, self.per_step, self.tokens = negative, heads, per_step, tokens
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps: dict[str, list[torch.Tensor]] = {}
        self.geometry: dict[str, tuple[int, int]] = {}
        self._step: dict[str, list[torch.Tensor]] = {}

    def accumulate(self, name: str, probs: torch.Tensor) -> None:
        p = probs[..., :self.tokens] if self.tokens else probs
        p = p.float() if self.heads else p.float().mean(1)
        self.sums[name] = self.sums[name] + p if name in self.sums else p
        self.counts[name] = self.counts.get(name, 0) + 1
        if self.per_step:
            self._step.setdefault(name, []).append(p.mean(1) if self.heads else p)

    def step_end(self) -> None:
        for name, ps in self._step.items():
            self.steps.setdefault(name, []).append((sum(ps) / len(ps)).to(self.step_dtype))
        self._step.clear()

    def step_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.steps.values() for t in ts)

    def maps(self, size: int = 64, layers=None) -> torch.Tensor:
        """The conditional maps' mean over layers and steps: (batch, tokens, size, size)."""
        out = []
        for name in self.sums if layers is None else [n for n in self.sums if n in layers]:
            s = self.sums[name] / self.counts[name]
            s = s.mean(1) if self.heads else s
            s = s[s.shape[0] // 2:] if self.negative else s
            m = s.transpose(1, 2).unflatten(2, self.geometry.get(name) or grid_shape(s.shape[1], None))
            out.append(F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False))
        if not out:
            raise StudioError("no cross-attention was captured")
        return torch.stack(out).mean(0)


class AttentionSession:
    """One capture, as a sampling hook; plugins (given `.session`) may add start, step_end and wrap."""

    def __init__(self, cross: CrossAttentionStore, self_steps=(), plugins=()):
        self.cross, self.self_steps, self.plugins = cross, set(self_steps), list(plugins)
        self.self_qk: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for p in self.plugins:
            p.session = self
        self.mode, self.step, self.cfg = "sample", 0, True
        self.guide_layers: set[int] = set()   # query counts (h*w) whose maps guidance reads
        self.guide_maps: dict[str, torch.Tensor] = {}
        self.latent_hw: tuple[int, int] | None = None
        self.geometry = cross.geometry  # shared with the store

    def begin(self, cfg: bool, latent_hw: tuple[int, int]) -> None:
        self.cfg, self.latent_hw, self.step = cfg, tuple(latent_hw), 0
        self.cross.negative = self.cross.negative and cfg  # no guidance: no negative half

    def start(self, pipe, request, latents, tick=None):
        self.begin(models.of(pipe).guided(request.guidance), latents.shape[-2:])
        for p in self.plugins:
            if hasattr(p, "start"):
                latents = p.start(pipe, request, latents)
        return latents

    def step_end(self, pipe, i, t, kwargs):
        self.cross.step_end()
        self.step = i + 1
        for p in self.plugins:
            if hasattr(p, "step_end"):
                kwargs = p.step_end(pipe, i, t, kwargs)
        return kwargs

    def cond_rows(self, batch: int) -> slice:
        return slice(batch // 2, None) if self.cfg else slice(None)

    def wrap(self, site: str, attn, proc):
        if attn.is_cross_attention:
            for p in self.plugins:
                if hasattr(p, "wrap"):
                    proc = p.wrap(site, proc)
        return CaptureProcessor(proc, self, site)

    def shape_of(self, name: str, n: int) -> None:
        if name not in self.geometry or math.prod(self.geometry[name]) != n:
            self.geometry[name] = grid_shape(n, self.latent_hw)

    def on_cross(self, name, attn, hidden_states, context) -> None:
        if self.mode == "guide" and hidden_states.shape[1] in self.guide_layers:
            self.shape_of(name, hidden_states.shape[1])
            self.guide_maps[name] = attention_probs(attn, *project_qk(attn, hidden_states, context)).mean(1)
        elif self.mode == "sample":
            self.shape_of(name, hidden_states.shape[1])
            rows = slice(None) if self.cross.negative else self.cond_rows(hidden_states.shape[0])
            with torch.no_grad():
                q, k = project_qk(attn, hidden_states[rows], context[rows])
                self.cross.accumulate(name, attention_probs(attn, q, k))

    def on_self(self, name, attn, hidden_states) -> None:
        if self.mode == "sample" and self.step in self.self_steps:
            self.shape_of(name, hidden_states.shape[1])
            with torch.no_grad():
                q, k = project_qk(attn, hidden_states[self.cond_rows(hidden_states.shape[0])])
            self.self_qk[(self.step, name)] = (q * attn.scale, k)  # row i: softmax(q_i K^T)


class CaptureProcessor:

    def __init__(self, base, session: AttentionSession, name: str):
        self.base, self.session, self.name = base, session, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        if hidden_states.ndim == 3 and attn.group_norm is None and attn.spatial_norm is None:
            if encoder_hidden_states is not None:
                self.session.on_cross(self.name, attn, hidden_states, encoder_hidden_states)
            else:
                self.session.on_self(self.name, attn, hidden_states)
        return self.base(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def install(patch, pipe, session: AttentionSession) -> None:
    sites = models.of(pipe).attention_sites(cross=None if session.self_steps else True)
    steering.install(patch, pipe, "attention", "attention capture", session, sites)
    steering.install(patch, pipe, "sampling", "attention capture", session)


@contextmanager
def capture(manager, **options):
    """Capture attention in the block's generations (lock held); yields the session."""
    with manager.lock, steering.temporary(manager.pipe) as patch:
        session = new_session(**options)
        install(patch, manager.pipe, session)
        yield session


def new_session(per_step: bool = False, heads: bool = False, negative: bool = False, tokens: int | None = None,
                self_steps=(), plugins=()) -> AttentionSession:
    return AttentionSession(CrossAttentionStore(negative, heads, per_step, tokens), self_steps, plugins)


def noising(pipe, timestep, repeats) -> tuple[int, int]:
    limit = pipe.scheduler.config.num_train_timesteps
    return whole("timestep", timestep, 0, limit - 1), whole("repeats", repeats, 1, 16)


def noised(model, picture, timestep: int, repeats: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pipe, dtype = model.pipe, model.denoiser.dtype
    latent = model.encode_images(to_tensor(picture)[None])
    noise = torch.randn((repeats, *latent.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
    t = torch.tensor([timestep], device=pipe.device)
    return DDPMScheduler.from_config(pipe.scheduler.config).add_noise(
        latent.expand(repeats, -1, -1, -1).to(pipe.device, dtype), noise.to(pipe.device, dtype), t), t


def encoded(model, prompts: list[str], repeats: int):
    return models.Conditioning.cat([model.encode([p]).rows(torch.zeros(repeats, dtype=torch.long)) for p in prompts])
