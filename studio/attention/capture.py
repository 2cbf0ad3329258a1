"""Capture cross-attention probabilities while every layer's output still comes from SDPA.

A CaptureProcessor wraps the layer's own processor: the output is computed by it unchanged (so
images are bit-identical with and without capture), and for cross-attention layers it also
computes softmax(scale * Q K^T) against the 77 text tokens - cheap - and adds its head mean for
the conditional half of the batch into a running sum per layer. Nothing N x N is ever formed.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


class CrossAttentionStore:
    """Running sums of head-averaged cross-attention probabilities, one per captured layer."""

    def __init__(self, cfg_batches: bool = True):
        self.cfg_batches = cfg_batches  # batch = [unconditional, conditional]: keep the second half
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, name: str, probs: torch.Tensor) -> None:
        """probs: (batch, heads, queries, tokens)."""
        if self.cfg_batches:
            probs = probs[probs.shape[0] // 2:]
        p = probs.float().mean(1)
        if name in self.sums:
            self.sums[name] += p
            self.counts[name] += 1
        else:
            self.sums[name], self.counts[name] = p, 1

    def maps(self, size: int = 64, layers=None) -> torch.Tensor:
        """Mean over layers (and steps) of each layer's map upsampled to size x size: (batch, tokens, size, size)."""
        out = []
        for name, s in self.sums.items():
            if layers is not None and name not in layers:
                continue
            b, n, t = s.shape
            side = int(round(n ** 0.5))
            m = (s / self.counts[name]).transpose(1, 2).reshape(b, t, side, side)
            out.append(F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False))
        if not out:
            raise ValueError("no cross-attention was captured")
        return torch.stack(out).mean(0)


class CaptureProcessor:
    def __init__(self, base, store: CrossAttentionStore, name: str):
        self.base, self.store, self.name = base, store, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None and hidden_states.ndim == 3 and attn.group_norm is None \
                and attn.spatial_norm is None:
            with torch.no_grad():
                context = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
                q, k = attn.to_q(hidden_states), attn.to_k(context)
                b, heads = q.shape[0], attn.heads
                q = q.view(b, -1, heads, q.shape[-1] // heads).transpose(1, 2)
                k = k.view(b, -1, heads, k.shape[-1] // heads).transpose(1, 2)
                self.store.add(self.name, (q @ k.transpose(-1, -2) * attn.scale).softmax(-1))
        return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@contextmanager
def capture_cross_attention(unet, store: CrossAttentionStore):
    """Install capture on every cross-attention layer (attn2); restore the exact processors after."""
    originals = dict(unet.attn_processors)
    unet.set_attn_processor({name: CaptureProcessor(p, store, name) if ".attn2." in name else p
                             for name, p in originals.items()})
    try:
        yield store
    finally:
        unet.set_attn_processor(originals)


def token_positions(tokenizer, prompt: str, word: str) -> list[int]:
    """Positions (in the 77-token sequence, SOS = 0) of the subword tokens of `word` in `prompt`."""
    ids = tokenizer(prompt).input_ids
    target = tokenizer(word, add_special_tokens=False).input_ids
    for i in range(1, len(ids) - len(target) + 1):
        if ids[i:i + len(target)] == target:
            return list(range(i, i + len(target)))
    raise ValueError(f"{word!r} is not a word of the prompt {prompt!r}")
