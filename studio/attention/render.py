"""Drawing maps: matplotlib colormaps blended over the image, masks as outlines, labelled grids.

Toy images are 64x64, so every tile is drawn at a display size (default 256) with the map
upsampled bilinearly: readable in the browser and in an exported PNG.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..errors import StudioError

COLORMAPS = ("jet", "turbo", "inferno", "viridis", "magma", "plasma", "coolwarm", "gray")


def colorize(m: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 through a matplotlib colormap."""
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise StudioError(f"unknown colormap {cmap!r}; try one of {', '.join(COLORMAPS)}")
    rgba = matplotlib.colormaps[cmap](np.clip(m, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _resize_map(m: torch.Tensor, size: int) -> np.ndarray:
    m = torch.as_tensor(m, dtype=torch.float32)
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def _outline(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels of a boolean mask."""
    m = torch.as_tensor(mask, dtype=torch.float32)[None, None]
    eroded = -F.max_pool2d(-m, 3, 1, 1)
    return (m - eroded)[0, 0].numpy() > 0


def overlay(image: Image.Image, m, cmap: str = "jet", alpha: float = 0.5, size: int = 256,
            mask=None) -> Image.Image:
    """The image at size x size with the map (values in [0, 1]) blended on top; a mask as an outline."""
    if not 0 <= alpha <= 1:
        raise StudioError(f"alpha must be from 0 to 1 (got {alpha})")
    base = np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
    heat = colorize(_resize_map(m, size), cmap).astype(np.float32)
    out = (1 - alpha) * base + alpha * heat
    if mask is not None:
        edge = _outline(_resize_map(torch.as_tensor(mask, dtype=torch.float32), size) >= 0.5)
        out[edge] = (255, 255, 255)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def labelled(tile: Image.Image, text: str, font_size: int = 16) -> Image.Image:
    """The tile with a caption bar underneath."""
    font = ImageFont.load_default(size=font_size)
    bar = font_size + 10
    out = Image.new("RGB", (tile.width, tile.height + bar), (255, 255, 255))
    out.paste(tile, (0, 0))
    draw = ImageDraw.Draw(out)
    width = draw.textlength(text, font=font)
    draw.text(((tile.width - width) / 2, tile.height + 4), text, fill=(20, 20, 20), font=font)
    return out


def grid(tiles: list[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    """Tiles of one size in rows of `columns`."""
    if not tiles:
        raise StudioError("nothing to draw")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    w, h = tiles[0].size
    out = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, t in enumerate(tiles):
        out.paste(t, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return out


def word_tiles(image: Image.Image, labels: list[str], maps: torch.Tensor, cmap: str = "jet", alpha: float = 0.5,
               masks: torch.Tensor | None = None, size: int = 256) -> list[tuple[Image.Image, str]]:
    """One (overlay, label) per word; maps (W, h, w) already normalized to [0, 1]."""
    return [(overlay(image, maps[i], cmap, alpha, size, None if masks is None else masks[i]), label)
            for i, label in enumerate(labels)]


def word_grid(image: Image.Image, labels: list[str], maps: torch.Tensor, cmap: str = "jet", alpha: float = 0.5,
              masks: torch.Tensor | None = None, size: int = 256, columns: int = 4) -> Image.Image:
    """The image first, then every word's overlay, each labelled: the PNG the export writes."""
    tiles = [labelled(image.convert("RGB").resize((size, size), Image.BICUBIC), "image")]
    tiles += [labelled(t, label) for t, label in word_tiles(image, labels, maps, cmap, alpha, masks, size)]
    return grid(tiles, columns)
