"""Training images for a concept, with kohya/A1111 sidecar captions (`cat1.png`, `cat1.txt`; '{}': the token)."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import StudioError
from ..images import load_rgb, square, to_tensor
from ..training import TrainingImage

MIN_IMAGES, MAX_IMAGES = 3, 50


def named(source) -> tuple[str, str | None]:
    """(display name, sidecar `.txt` caption or None) of a training image."""
    if not isinstance(source, (str, os.PathLike)):
        return "image", None
    path = Path(source)
    text = path.with_suffix(".txt")
    caption = text.read_text(encoding="utf-8", errors="replace").strip() if text.is_file() else ""
    return path.name, caption or None


def load_images(sources, resolution: int, captions: list | None = None) -> tuple[list[TrainingImage], list[str]]:
    """The training images and notes for the user (resizes, crops); `.txt` sources are captions, not images."""
    sources = [s for s in (sources or []) if not (isinstance(s, (str, Path)) and Path(str(s)).suffix == ".txt")]
    if len(sources) < MIN_IMAGES:
        raise StudioError(f"{len(sources)} image(s) given; a concept needs at least {MIN_IMAGES} (3-10 varied ones)")
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
