"""Training images for a concept: loaded, checked, squared and resized, with optional captions.

Captions follow the kohya/A1111 convention: `cat1.png` may come with `cat1.txt`; '{}' in a caption marks where
the token goes (else it goes in front). Masks (for extraction) are optional and weight the loss to the object.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import StudioError
from ..images import load_rgb, square, to_tensor
from ..training import TrainingImage

MIN_IMAGES, MAX_IMAGES = 3, 50


def named(source) -> tuple[str, str | None]:
    """(display name, sidecar caption) of a training image: a file's name and its `.txt`, if there is one."""
    if not isinstance(source, (str, os.PathLike)):
        return "image", None
    path = Path(source)
    text = path.with_suffix(".txt")
    caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""
    return path.name, caption or None


def load_images(sources, resolution: int, captions: list | None = None) -> tuple[list[TrainingImage], list[str]]:
    """The training images and the notes for the user (resizes, crops); bad input raises StudioError.

    Sidecar `.txt` files given among the sources are read as captions, not as images."""
    sources = [s for s in (sources or []) if not (isinstance(s, (str, Path)) and Path(str(s)).suffix == ".txt")]
    if len(sources) < MIN_IMAGES:
        raise StudioError(f"{len(sources)} image(s) given; teaching a concept needs at least {MIN_IMAGES} "
                          f"(3-10 varied images work best)")
    if len(sources) > MAX_IMAGES:
        raise StudioError(f"{len(sources)} images given; at most {MAX_IMAGES} are used for one concept")
    out, notes = [], []
    for i, source in enumerate(sources):
        image, alpha = load_rgb(source)
        name, caption = named(source)
        caption = (captions[i] if captions and i < len(captions) else None) or caption
        notes += [f"{name}: {alpha}"] if alpha else []
        w, h = image.size
        if min(w, h) < resolution // 2:
            notes.append(f"{name} is only {w}x{h}: upscaled to {resolution}x{resolution}, expect blur")
        elif max(w, h) > 4 * resolution:
            notes.append(f"{name} ({w}x{h}) was downscaled to {resolution}x{resolution}")
        if w != h:
            notes.append(f"{name} is not square: centre-cropped")
        out.append(TrainingImage(to_tensor(square(image, resolution)), caption, name))
    return out, notes
