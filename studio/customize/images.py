"""Training images for a concept: loaded, checked, squared and resized, with optional captions.

Captions follow the kohya/A1111 convention: `cat1.png` may come with `cat1.txt`; '{}' in a caption
marks where the token goes (without it the token is put in front). Masks (for extraction) are
optional per image and weight the loss to the object's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import StudioError

MIN_IMAGES, MAX_IMAGES = 3, 50
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class TrainingImage:
    tensor: torch.Tensor  # [3, R, R] in [-1, 1]
    caption: str | None = None
    name: str = ""
    mask: torch.Tensor | None = field(default=None, repr=False)  # [R, R] in {0, 1}


def square(image: Image.Image, resolution: int) -> Image.Image:
    """Centre crop to a square and resize to `resolution` (what diffusers' training scripts do)."""
    w, h = image.size
    side = min(w, h)
    box = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)
    return image.crop(box).resize((resolution, resolution), Image.BICUBIC)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1).contiguous()


def open_image(source) -> tuple[Image.Image, str, str | None]:
    """(RGB image, display name, sidecar caption) from a path or a PIL image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB"), "image", None
    path = Path(str(source))
    if not path.is_file():
        raise StudioError(f"{path.name or path}: no such file")
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError):
        raise StudioError(f"{path.name} is not an image file (accepted: {', '.join(sorted(IMAGE_SUFFIXES))})") from None
    text = path.with_suffix(".txt")
    caption = text.read_text(encoding="utf-8", errors="replace").strip() or None if text.is_file() else None
    return image, path.name, caption


def load_images(sources, resolution: int, captions: list[str | None] | None = None,
                minimum: int = MIN_IMAGES) -> tuple[list[TrainingImage], list[str]]:
    """The training images and the notes for the user (resizes, crops); bad input raises StudioError.

    Sidecar `.txt` files given among the sources are read as captions, not as images."""
    sources = [s for s in (sources or []) if not (isinstance(s, (str, Path)) and Path(str(s)).suffix == ".txt")]
    if len(sources) < minimum:
        raise StudioError(f"{len(sources)} image(s) given; teaching a concept needs at least {minimum} "
                          f"(3-10 varied images work best)")
    if len(sources) > MAX_IMAGES:
        raise StudioError(f"{len(sources)} images given; at most {MAX_IMAGES} are used for one concept")
    out, notes = [], []
    for i, source in enumerate(sources):
        image, name, caption = open_image(source)
        if captions and i < len(captions) and captions[i]:
            caption = captions[i]
        w, h = image.size
        if min(w, h) < resolution // 2:
            notes.append(f"{name} is only {w}x{h}: upscaled to {resolution}x{resolution}, expect blur")
        elif max(w, h) > 4 * resolution:
            notes.append(f"{name} ({w}x{h}) was downscaled to {resolution}x{resolution}")
        if w != h:
            notes.append(f"{name} is not square: centre-cropped")
        out.append(TrainingImage(to_tensor(square(image, resolution)), caption, name))
    return out, notes
