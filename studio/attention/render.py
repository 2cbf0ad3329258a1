"""Drawing maps: colormaps over the image, masks as outlines, labelled grids, at a display size (toys are 64x64)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..errors import StudioError

COLORMAPS = ("jet", "turbo", "inferno", "viridis", "magma", "plasma", "coolwarm", "gray")


def colorize(m: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 through a matplotlib colormap."""
    import matplotlib

    if cmap not in matplotlib.colormaps:
        raise StudioError(f"unknown colormap {cmap!r}; try one of {', '.join(COLORMAPS)}")
    return (matplotlib.colormaps[cmap](np.clip(m, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def _resize_map(m, size: int) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float32)
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]


def shown_image(image: Image.Image, size: int) -> Image.Image:
    return image.convert("RGB").resize((size, size), Image.BICUBIC)


def overlay(image: Image.Image, m, cmap: str = "jet", alpha: float = 0.5, size: int = 256,
            mask=None) -> Image.Image:
    """The image at size x size, the map (in [0, 1]) blended on top, a mask as an outline."""
    if not 0 <= alpha <= 1:
        raise StudioError(f"alpha must be from 0 to 1 (got {alpha})")
    out = (1 - alpha) * np.asarray(shown_image(image, size), dtype=np.float32)
    out += alpha * colorize(_resize_map(m, size).numpy(), cmap).astype(np.float32)
    if mask is not None:  # the mask's boundary: pixels its 3x3 erosion removes
        m = (_resize_map(mask, size) >= 0.5).float()[None, None]
        out[(m + F.max_pool2d(-m, 3, 1, 1))[0, 0].numpy() > 0] = (255, 255, 255)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def labelled(tile: Image.Image, text: str, font_size: int = 16) -> Image.Image:
    """The tile with a caption bar underneath."""
    font = ImageFont.load_default(size=font_size)
    out = ImageOps.expand(tile, (0, 0, 0, font_size + 10), fill=(255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text(((tile.width - draw.textlength(text, font=font)) / 2, tile.height + 4), text, fill=(20, 20, 20),
              font=font)
    return out


def grid(tiles: list[Image.Image], columns: int = 4, pad: int = 4) -> Image.Image:
    if not tiles:
        raise StudioError("nothing to draw")
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    w, h = tiles[0].size
    out = Image.new("RGB", (columns * w + (columns + 1) * pad, rows * h + (rows + 1) * pad), (255, 255, 255))
    for i, t in enumerate(tiles):
        out.paste(t, (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return out
