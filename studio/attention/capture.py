"""Capture attention while every layer's output still comes from the layer's own (SDPA) processor.

A CaptureProcessor wraps a layer's processor: the output is computed by it unchanged, so images
are bit-identical with and without capture. On the side, for cross-attention it computes
softmax(scale * Q K^T) against the text tokens (77 keys: cheap) for the rows it needs (the
conditional half of a classifier-free-guidance batch; the negative half too when asked), and
adds its head mean into one running sum per layer: one matmul, one softmax, one add per layer,
no Python loop over tokens or heads. Self-attention is N x N, so it is never formed here: at the
steps asked for, the layer's Q and K are kept and one query row is computed later, on demand.

Installing is an edit-free hook: `install` wraps the processors as steering slots of a temporary
patch, which puts back the exact original objects when the block ends, so the model, its
fingerprint and the edit history are untouched.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .. import models, steering
from ..errors import StudioError


# -- one layer's queries and keys, as the processors compute them ----------------------------------
def project_qk(attn, hidden_states: torch.Tensor, context: torch.Tensor | None = None):
    """Head-split Q (B, H, N, d) and K (B, H, M, d) of a diffusers Attention, as AttnProcessor2_0 forms them."""
    if context is None:
        context = hidden_states
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    q, k = attn.to_q(hidden_states), attn.to_k(context)
    b, heads = q.shape[0], attn.heads
    q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
    k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return q, k


def attention_probs(attn, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(scale * Q K^T) in fp32: (B, H, N, M)."""
    return (torch.matmul(q * attn.scale, k.transpose(-1, -2))).float().softmax(-1)


def grid_shape(n: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """The (h, w) of a layer with n queries: the latent halved (rounding up) until it fits."""
    if latent_hw is not None:
        h, w = latent_hw
        for _ in range(8):
            if h * w == n:
                return h, w
            h, w = math.ceil(h / 2), math.ceil(w / 2)
    side = int(round(n ** 0.5))
    if side * side != n:
        raise StudioError(f"cannot tell the shape of an attention layer with {n} positions")
    return side, side


def block_of(name: str) -> str:
    """'down', 'mid' or 'up': where in the UNet a processor name lives."""
    return "down" if name.startswith("down") else "up" if name.startswith("up") else "mid"


# -- cross-attention store -------------------------------------------------------------------------
class CrossAttentionStore:
    """Running sums of cross-attention probabilities per layer, and optional per-step copies.

    sums[name]: (rows, N, T), or (rows, H, N, T) with `heads`; rows are the captured batch rows
    (the conditional half; with `negative` the whole [negative, conditional] batch). T keeps the
    first `tokens` positions (SOS, the words, EOS: padding carries no word). steps[name] holds one
    head-averaged (rows, N, T) copy per denoising step, in `step_dtype`, for scrubbing through time.
    """

    def __init__(self, cfg_batches: bool = True, negative: bool = False, heads: bool = False,
                 per_step: bool = False, tokens: int | None = None, step_dtype: torch.dtype = torch.float16):
        self.cfg_batches, self.negative, self.heads = cfg_batches, negative, heads
        self.per_step, self.tokens, self.step_dtype = per_step, tokens, step_dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps: dict[str, list[torch.Tensor]] = {}
        self.geometry: dict[str, tuple[int, int]] = {}
        self._step: dict[str, list] = {}

    def rows(self, batch: int) -> slice:
        """Which rows of a UNet batch to capture."""
        return slice(batch // 2, None) if self.cfg_batches and not self.negative else slice(None)

    def accumulate(self, name: str, probs: torch.Tensor) -> None:
        """probs: (rows, heads, queries, tokens) of the captured rows only."""
        p = probs[..., :self.tokens] if self.tokens else probs
        p = p.float() if self.heads else p.float().mean(1)
        if name in self.sums:
            self.sums[name] += p
            self.counts[name] += 1
        else:
            self.sums[name], self.counts[name] = p.clone(), 1
        if self.per_step:
            mean = p.mean(1) if self.heads else p
            acc = self._step.get(name)
            self._step[name] = [mean.clone(), 1] if acc is None else [acc[0] + mean, acc[1] + 1]

    def add(self, name: str, probs: torch.Tensor) -> None:
        """probs of a whole UNet batch: (batch, heads, queries, tokens)."""
        self.accumulate(name, probs[self.rows(probs.shape[0])])

    def step_end(self) -> None:
        """Close one denoising step: keep its head-averaged maps (per_step only)."""
        for name, (acc, n) in self._step.items():
            self.steps.setdefault(name, []).append((acc / n).to(self.step_dtype))
        self._step.clear()

    def step_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ts in self.steps.values() for t in ts)

    def maps(self, size: int = 64, layers=None) -> torch.Tensor:
        """Mean over layers (and steps) of each layer's conditional map at size x size: (batch, tokens, size, size)."""
        out = []
        for name, s in self.sums.items():
            if layers is not None and name not in layers:
                continue
            s = s / self.counts[name]
            if self.heads:
                s = s.mean(1)
            if self.negative and self.cfg_batches:
                s = s[s.shape[0] // 2:]
            b, n, t = s.shape
            h, w = self.geometry.get(name) or grid_shape(n, None)
            m = s.transpose(1, 2).reshape(b, t, h, w)
            out.append(F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False))
        if not out:
            raise StudioError("no cross-attention was captured")
        return torch.stack(out).mean(0)


# -- the session: what the processors feed during one job ------------------------------------------
class AttentionSession:
    """State of one capture: the stores, the current step, and the plugins (guidance, reweighting).

    It is also a sampling hook for PipelineManager.generate: `start` learns the batch layout and the
    latent size, `step_end` closes a step. Plugins may add their own start/step_end and `wrap`
    cross-attention processors (prompt-to-prompt reweighting).
    mode "sample": capture as asked; "guide": only collect the guide maps, with gradients.
    """

    def __init__(self, cross: CrossAttentionStore | None = None, self_steps=(), plugins=()):
        self.cross = cross
        self.self_steps = set(self_steps)
        self.self_qk: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.plugins = list(plugins)
        for p in self.plugins:
            if hasattr(p, "bind"):
                p.bind(self)
        self.mode = "sample"
        self.guide_layers: set[int] = set()   # query counts (h*w) whose maps guidance reads
        self.guide_maps: dict[str, torch.Tensor] = {}
        self.step = 0
        self.cfg = cross.cfg_batches if cross is not None else True
        self.latent_hw: tuple[int, int] | None = None
        self.geometry: dict[str, tuple[int, int]] = {}

    # sampling hooks ---------------------------------------------------------------------------
    def begin(self, cfg: bool, latent_hw: tuple[int, int]) -> None:
        """The batch layout ([negative, prompt] rows when cfg) and the latent size of the coming passes."""
        self.cfg, self.latent_hw, self.step = cfg, tuple(latent_hw), 0
        if self.cross is not None:
            self.cross.cfg_batches = cfg
            self.cross.negative = self.cross.negative and cfg  # no guidance: no negative half

    def start(self, pipe, request, latents, tick=None):
        self.begin(request.guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None,
                   latents.shape[-2:])
        for p in self.plugins:
            if hasattr(p, "start"):
                latents = p.start(pipe, request, latents)
        return latents

    def step_end(self, pipe, i, t, kwargs):
        if self.cross is not None:
            self.cross.step_end()
        self.step = i + 1
        for p in self.plugins:
            if hasattr(p, "step_end"):
                kwargs = p.step_end(pipe, i, t, kwargs)
        return kwargs

    def cond_rows(self, batch: int) -> slice:
        return slice(batch // 2, None) if self.cfg else slice(None)

    def wrap(self, site: str, attn, proc):
        """The processor of an attention site while capturing: plugins (reweighting) wrap cross-attention first."""
        if attn.is_cross_attention:
            for p in self.plugins:
                if hasattr(p, "wrap"):
                    proc = p.wrap(site, proc)
        return CaptureProcessor(proc, self, site)

    # called by the processors -----------------------------------------------------------------
    def shape_of(self, name: str, n: int) -> tuple[int, int]:
        if name not in self.geometry or self.geometry[name][0] * self.geometry[name][1] != n:
            self.geometry[name] = grid_shape(n, self.latent_hw)
            if self.cross is not None:
                self.cross.geometry[name] = self.geometry[name]
        return self.geometry[name]

    def on_cross(self, name, attn, hidden_states, context) -> None:
        if self.mode == "guide":
            if hidden_states.shape[1] in self.guide_layers:
                self.shape_of(name, hidden_states.shape[1])
                q, k = project_qk(attn, hidden_states, context)
                self.guide_maps[name] = attention_probs(attn, q, k).mean(1)
            return
        if self.cross is None:
            return
        self.shape_of(name, hidden_states.shape[1])
        with torch.no_grad():
            rows = self.cross.rows(hidden_states.shape[0])
            q, k = project_qk(attn, hidden_states[rows], context[rows])
            self.cross.accumulate(name, attention_probs(attn, q, k))

    def on_self(self, name, attn, hidden_states) -> None:
        if self.mode != "sample" or self.step not in self.self_steps:
            return
        self.shape_of(name, hidden_states.shape[1])
        with torch.no_grad():
            q, k = project_qk(attn, hidden_states[self.cond_rows(hidden_states.shape[0])])
            self.self_qk[(self.step, name)] = ((q * attn.scale).detach(), k.detach())  # row i: softmax(q_i K^T)


class CaptureProcessor:
    """Wraps a layer's processor: its output untouched, the session fed on the side."""

    def __init__(self, base, session: AttentionSession, name: str):
        self.base, self.session, self.name = base, session, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if hidden_states.ndim == 3 and attn.group_norm is None and attn.spatial_norm is None:
            if encoder_hidden_states is not None:
                self.session.on_cross(self.name, attn, hidden_states, encoder_hidden_states)
            else:
                self.session.on_self(self.name, attn, hidden_states)
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def install(patch, pipe, session: AttentionSession) -> None:
    """Wrap the processors the session needs (cross-attention; self-attention too at `self_steps`) and make
    the session a sampling hook of the pipeline, as steering slots of `patch`."""
    sites = models.of(pipe).attention_sites(cross=None if session.self_steps else True)
    steering.install(patch, pipe, "attention", "attention capture", session, sites)
    steering.install(patch, pipe, "sampling", "attention capture", session)


@contextmanager
def capture(manager, **options):
    """Capture attention in the generations run inside the block (the manager's lock held); yields the
    AttentionSession. Options are those of `new_session`. Leaving the block restores the exact originals."""
    with manager.lock, steering.temporary(manager.pipe) as patch:
        session = new_session(**options)
        install(patch, manager.pipe, session)
        yield session


def new_session(cross: bool = True, per_step: bool = False, heads: bool = False, negative: bool = False,
                tokens: int | None = None, self_steps=(), plugins=()) -> AttentionSession:
    """A session capturing cross-attention (optionally per step, per head, the negative half) and
    self-attention Q/K at `self_steps`; `plugins` add guidance or reweighting."""
    store = CrossAttentionStore(negative=negative, heads=heads, per_step=per_step, tokens=tokens) if cross else None
    return AttentionSession(store, self_steps, plugins)


def cross_attention_resolutions(unet) -> list[int]:
    """Latent-grid heights of the UNet's cross-attention layers at its default size (finest first)."""
    cfg = unet.config
    n = len(cfg.block_out_channels)
    levels = {i for i, t in enumerate(cfg.down_block_types) if "CrossAttn" in t}
    levels |= {n - 1 - j for j, t in enumerate(cfg.up_block_types) if "CrossAttn" in t}
    if cfg.mid_block_type and "CrossAttn" in cfg.mid_block_type:
        levels.add(n - 1)
    side = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    return sorted({math.ceil(side / 2 ** k) for k in levels}, reverse=True)
