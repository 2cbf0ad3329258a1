"""Pictures in: opening and converting uploads, the model's square, and masks fitted to it.

Every tab and command takes pictures as paths, PIL images or arrays (with alpha, EXIF rotation, any size,
or not pictures at all) and must treat and refuse them alike, so each step is written once, here.
Core layer: imports no feature package.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import StudioError

MAX_SIDE = 4096  # larger pictures are reduced on opening: no job reads more, and a 13000² upload would hold GBs


def open_image(image) -> Image.Image:
    """A PIL image (any mode, alpha kept) from a path, a PIL image or an array; StudioError otherwise.

    Files are read whole, reduced to at most MAX_SIDE pixels a side as they are decoded (info["original_size"]
    keeps the file's size, for clicks made on it), and turned upright by their EXIF orientation; truncated
    files and files with more pixels than PIL opens safely (decompression bombs) are refused."""
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
                im.draft(im.mode, (size[0] * MAX_SIDE // max(size), size[1] * MAX_SIDE // max(size)))  # JPEG: decode small
            im.load()
            factor = -(-max(im.size) // MAX_SIDE)
            out = ImageOps.exif_transpose(im.reduce(factor) if factor > 1 else im)
            out.info["original_size"] = size
            return out
    except Image.DecompressionBombError:
        raise StudioError(f"cannot read {path.name!r}: it has more pixels than can be opened safely "
                          f"(over {2 * Image.MAX_IMAGE_PIXELS}); scale it down first") from None
    except UnidentifiedImageError:
        raise StudioError(f"cannot read {path.name!r} as an image: it is not an image file; "
                          "upload a PNG, JPEG or WebP") from None
    except OSError as exc:
        raise StudioError(f"cannot read {path.name!r} as an image: the file is damaged or cut short ({exc})") from None


def from_array(a: np.ndarray) -> Image.Image:
    """H x W (grey), H x W x 3 (RGB) or H x W x 4 (RGBA); bool, uint8, or floats in 0..1 (or 0..255)."""
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise StudioError(f"the image must be H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grey); "
                          f"got an array of shape {a.shape}")
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    elif a.dtype != np.uint8:
        a = a.astype(np.float64)
        if not np.isfinite(a).all():
            raise StudioError("the image has NaN or infinite pixel values")
        a = np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).round().astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def flatten_alpha(im: Image.Image) -> tuple[Image.Image, str | None]:
    """RGB, with transparent pixels composited on white; a note if any pixel was (partly) transparent."""
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        alpha = np.asarray(rgba)[..., 3]
        if alpha.max() == 0:
            raise StudioError("the image is fully transparent: there is nothing to see in it")
        if alpha.min() < 255:
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat = Image.alpha_composite(white, rgba).convert("RGB")
            return flat, "transparent pixels were put on a white background"
    return im.convert("RGB"), None


def load_rgb(image) -> tuple[Image.Image, str | None]:
    """The RGB picture of a path, PIL image or array (at least 8x8; transparency on white, with a note)."""
    im = open_image(image)
    if min(im.size) < 8:
        raise StudioError(f"the image is too small ({im.width}x{im.height}); it needs at least 8x8 pixels")
    return flatten_alpha(im)


def crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square (left, top, right, bottom) that `square` keeps of a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def square(image: Image.Image, size: int, resample=Image.BICUBIC) -> Image.Image:
    """The centred square of `image` (`crop_box`) at size x size."""
    return image.crop(crop_box(*image.size)).resize((size, size), resample)


def to_tensor(image) -> torch.Tensor:
    """(3, H, W) float32 in [-1, 1] of an RGB picture (PIL or H x W x 3 uint8): what the VAE encodes."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


def fit_mask(mask, size: int) -> np.ndarray:
    """A mask drawn on the original image, with the crop and resize of `square`: (size, size) bool.

    Accepts bool or 0..1 arrays, uint8 0..255 images (grey, RGB or RGBA: any channel set counts)."""
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m[..., :3].max(-1) if m.shape[-1] in (3, 4) else m[..., 0]
    if m.ndim != 2:
        raise StudioError(f"a mask must be a 2-D array (got shape {m.shape})")
    m = m.astype(np.float32)
    if m.max() > 1:
        m = m / 255.0
    h, w = m.shape
    left, top, right, bottom = crop_box(w, h)
    t = torch.from_numpy(np.ascontiguousarray(m[top:bottom, left:right]))[None, None]
    if t.shape[-1] >= size:
        t = F.interpolate(t, size=(size, size), mode="area")
    else:
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)
    return (t[0, 0] >= 0.5).numpy()
