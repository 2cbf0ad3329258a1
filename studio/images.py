"""Pictures in, the model's square and masks fitted to it: every tab and command treats pictures alike."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import StudioError

MAX_SIDE = 4096  # larger pictures are reduced on opening: no job reads more, and a 13000² upload would hold GBs
MIN_SIDE = 8  # one latent pixel of the VAE (8x8 pixels): a smaller picture holds nothing to learn or read


def open_image(image) -> Image.Image:
    """A PIL image (any mode), reduced to MAX_SIDE as decoded (info["original_size"]: the file's), EXIF-upright."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise StudioError("no image: upload one first")
    if isinstance(image, np.ndarray):
        return from_array(image)
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, os.PathLike)):
        raise StudioError(f"expected an image (a file path, a PIL image or an array), got {type(image).__name__}")
    path = Path(image)
    if not path.is_file():
        raise StudioError(f"cannot read the image {path.name!r}: no such file")
    try:
        with Image.open(path) as im:
            size = im.size
            if max(size) > MAX_SIDE:
                im.draft(im.mode, tuple(n * MAX_SIDE // max(size) for n in size))  # JPEG: decode small
            im.load()
            factor = -(-max(im.size) // MAX_SIDE)
            out = ImageOps.exif_transpose(im.reduce(factor) if factor > 1 else im)
            out.info["original_size"] = size
            return out
    except Image.DecompressionBombError:
        raise StudioError(f"{path.name!r} has too many pixels to open safely: scale it down first") from None
    except UnidentifiedImageError:
        raise StudioError(f"cannot read {path.name!r} as an image: not an image file; upload a PNG or JPEG") from None
    except OSError as exc:
        raise StudioError(f"cannot read {path.name!r} as an image: the file is damaged or cut short ({exc})") from None


def from_array(a: np.ndarray) -> Image.Image:
    """H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA); bool, uint8, or floats in 0..1 (or 0..255)."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise StudioError(f"the image must be H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grey), not shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise StudioError("the image has NaN or infinite pixel values")
        a = np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def load_rgb(image) -> tuple[Image.Image, str | None]:
    """The RGB picture, and a note if transparent pixels were put on white."""
    im = open_image(image)
    if min(im.size) < MIN_SIDE:
        raise StudioError(f"the image is too small ({im.width}x{im.height}): it needs {MIN_SIDE}x{MIN_SIDE} pixels")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.max() == 0:
            raise StudioError("the image is fully transparent: there is nothing to see in it")
        if alpha.min() < 255:
            flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
            return flat, "transparent pixels were put on a white background"
    return im.convert("RGB"), None


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def square(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    return image.crop(crop_box(*image.size)).resize((size, size), resample)


def to_tensor(image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] of an RGB picture (PIL or H x W x 3 uint8): what the VAE encodes."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


def fit_mask(mask, size: int) -> np.ndarray:
    """A mask (bool, 0..1 or 0..255; any channel) on the original image, cropped and resized as `square` does."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., :3].max(-1) if m.shape[-1] in (3, 4) else m[..., 0]
    if m.ndim != 2:
        raise StudioError(f"a mask must be a 2-D array (got shape {m.shape})")
    m = m.astype(np.float32) / (255.0 if m.max() > 1 else 1.0)
    left, top, right, bottom = crop_box(*m.shape[::-1])
    t = torch.from_numpy(np.ascontiguousarray(m[top:bottom, left:right]))[None, None]
    mode = {"mode": "area"} if t.shape[-1] >= size else {"mode": "bilinear", "align_corners": False}
    t = F.interpolate(t, size=(size, size), **mode)
    return (t[0, 0] >= 0.5).numpy()
