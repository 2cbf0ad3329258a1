"""Self-attention on demand from the kept Q and K: a clicked pixel's row (never all N x N), and the top
components (prompt-to-prompt) where N <= 32^2."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import StudioError
from .maps import BLOCKS
from .result import AttentionResult, LayerInfo

EXPLICIT_LIMIT = 32 * 32


def _layers(result: AttentionResult, step: int | None, resolutions, blocks) -> tuple[int, list[LayerInfo]]:
    if not result.self_qk:
        raise StudioError("self-attention was not kept for this result: choose a self-attention step and run again")
    steps = sorted(result.self_qk)
    step = steps[0] if step is None else int(step)
    if step not in result.self_qk:
        raise StudioError(f"self-attention was kept at step {', '.join(map(str, steps))} only (asked for {step})")
    layers = [layer for layer in map(result.self_layers.get, result.self_qk[step])
              if layer.block in blocks and (resolutions is None or layer.h in resolutions)]
    if not layers:
        raise StudioError("no self-attention layer matches the chosen resolutions and blocks")
    return step, layers


def pixel_row(result: AttentionResult, x: float, y: float, image: int = 0, step: int | None = None,
              resolutions=None, blocks=BLOCKS, head: int | None = None) -> torch.Tensor:
    """Where image pixel (x, y) attends: (h, w) on the finest chosen layer, summing to ~1."""
    height, width = result.size
    if not (0 <= x < width and 0 <= y < height):
        raise StudioError(f"pixel ({x}, {y}) is outside the {width}x{height} image")
    if not 0 <= image < len(result.images):
        raise StudioError(f"image {image} does not exist (this result has {len(result.images)})")
    step, layers = _layers(result, step, resolutions, blocks)
    h, w = max(layer.h for layer in layers), max(layer.w for layer in layers)
    out = 0
    for layer in layers:
        q, k = result.self_qk[step][layer.name]
        if head is not None and not 0 <= int(head) < q.shape[1]:
            raise StudioError(f"head {head} does not exist: the layers have heads 0..{q.shape[1] - 1}")
        i = int(y * layer.h / height) * layer.w + int(x * layer.w / width)
        row = torch.einsum("hd,hnd->hn", q[image, :, i].float(), k[image].float()).softmax(-1)  # q pre-scaled
        m = (row.mean(0) if head is None else row[int(head)]).reshape(1, 1, layer.h, layer.w)
        if (layer.h, layer.w) != (h, w):  # still a distribution on the finer grid
            m = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False) * (layer.h * layer.w) / (h * w)
        out = out + m[0, 0]
    return out / len(layers)


def explicit_matrix(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The full (H, N, N) self-attention of one image: only for N <= 32^2."""
    if q.shape[-2] > EXPLICIT_LIMIT:
        raise StudioError(f"a full self-attention matrix is formed only up to {EXPLICIT_LIMIT} positions "
                          f"(this layer has {q.shape[-2]}): click pixels instead")
    return (q.float() @ k.float().transpose(-1, -2)).softmax(-1)  # q was stored pre-scaled


def components(result: AttentionResult, n: int = 6, image: int = 0, step: int | None = None,
               resolution: int | None = None, blocks=BLOCKS) -> tuple[int, torch.Tensor]:
    """(resolution, (n, h, w) in [0, 1]): top principal components of the row-centred self-attention at <= 32."""
    step, layers = _layers(result, step, None, blocks)
    small = sorted({layer.h for layer in layers if layer.h * layer.w <= EXPLICIT_LIMIT}, reverse=True)
    if not small:
        raise StudioError("every self-attention layer is larger than 32x32: click pixels instead")
    resolution = small[0] if resolution is None else int(resolution)
    if resolution not in small:
        raise StudioError(f"choose a resolution of {', '.join(map(str, small))} for components")
    chosen = [layer for layer in layers if layer.h == resolution]
    a = torch.stack([explicit_matrix(*(t[image] for t in result.self_qk[step][layer.name])).mean(0)
                     for layer in chosen]).mean(0)
    _, _, vh = torch.linalg.svd(a - a.mean(1, keepdim=True))
    comps = vh[:n].reshape(-1, chosen[0].h, chosen[0].w)
    lo, hi = comps.amin((1, 2), keepdim=True), comps.amax((1, 2), keepdim=True)
    return resolution, (comps - lo) / (hi - lo).clamp_min(1e-12)
