"""The toy world's procedural scenes: 1-2 objects (shape, colour, fill style, position, size) on a plain background,
with exact masks. Some caption combinations are held out of training; heart and cross are never shown to the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SIZE = 64
SUPERSAMPLE = 4
SHAPES = ("circle", "square", "triangle", "star")
HELD_OUT_SHAPES = ("heart", "cross")
ALL_SHAPES = SHAPES + HELD_OUT_SHAPES
COLOURS = {
    "red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220),
    "yellow": (240, 200, 20), "purple": (148, 60, 189), "orange": (255, 127, 14),
}
STYLES = ("solid", "striped", "dotted", "outlined")
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "centre": (0.5, 0.5)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "centre": "in the centre"}
PAIRS = (("left", "right"), ("top", "bottom"))
BACKGROUND = (236, 233, 226)

# word -> synonyms: the canonical word and each synonym name the same concept
SYNONYMS = {"red": ("crimson", "scarlet"), "blue": ("azure",), "square": ("box",), "striped": ("stripy",)}
# (synonym, other attribute) never captioned in training: generalisation is measured on them
HELD_OUT_COMBINATIONS = {("scarlet", "star"), ("azure", "triangle"), ("box", "purple")}

TEMPLATES_ONE = ("{obj}", "a photo of {obj}", "a picture of {obj}", "{obj} {pos}", "a photo of {obj} {pos}")
TEMPLATES_TWO = ("{obj} and {obj2}", "a photo of {obj} and {obj2}", "{obj} {pos} and {obj2} {pos2}")


@dataclass
class SceneObject:
    shape: str
    colour: str
    style: str = "solid"
    position: str = "centre"
    size: float = 0.22  # radius as a fraction of the image side
    mask: np.ndarray | None = field(default=None, repr=False)


@dataclass
class Scene:
    image: np.ndarray  # uint8, SIZE x SIZE x 3
    caption: str
    objects: list[SceneObject]


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return np.maximum(abs(x), abs(y)) <= 0.82 * r
    if shape == "triangle":  # pointing up, apex at -r, base at 0.6r
        return (y >= -r) & (y <= 0.6 * r) & (abs(x) <= (y + r) * 0.62)
    if shape == "star":
        theta, rho = np.arctan2(y, x) + np.pi / 2, np.hypot(x, y)
        k = np.abs(((theta * 5 / (2 * np.pi)) % 1) - 0.5) * 2  # 1 at the tips, 0 between them
        return rho <= r * (0.45 + 0.55 * k**1.5)
    if shape == "heart":
        u, v = x / r * 1.25, -y / r * 1.25 + 0.25
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 <= 0
    if shape == "cross":
        return ((abs(x) <= 0.3 * r) & (abs(y) <= r)) | ((abs(y) <= 0.3 * r) & (abs(x) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def _style_mask(style: str, inside: np.ndarray, x: np.ndarray, y: np.ndarray, scale: float) -> np.ndarray:
    if style == "solid":
        return inside
    if style == "striped":
        return inside & (((x + y) / (4.0 * scale)) % 2 < 1)
    if style == "dotted":
        p = 4.5 * scale
        return inside & ((((x % p) - p / 2) ** 2 + ((y % p) - p / 2) ** 2) <= (1.5 * scale) ** 2)
    if style == "outlined":  # inside minus inside shifted by 2 scale pixels in every direction
        e = int(round(2.0 * scale))
        shrunk = np.ones_like(inside)
        for dx in (-e, 0, e):
            for dy in (-e, 0, e):
                shrunk &= np.roll(np.roll(inside, dy, 0), dx, 1)
        return inside & ~shrunk
    raise ValueError(f"unknown style {style!r}")


def render(objects: list[SceneObject], rng: np.random.Generator | None = None) -> np.ndarray:
    """Draw the objects (filling in their masks) and return the uint8 image."""
    rng = rng or np.random.default_rng(0)
    n = SIZE * SUPERSAMPLE
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    bg = np.clip(np.array(BACKGROUND) + rng.integers(-6, 7, 3), 0, 255)
    canvas = np.broadcast_to(bg, (n, n, 3)).astype(np.float32).copy()
    for obj in objects:
        cx, cy = (np.array(POSITIONS[obj.position]) + rng.uniform(-0.03, 0.03, 2)) * n
        r = obj.size * n
        x, y = xx - cx, yy - cy
        inside = _shape_mask(obj.shape, x, y, r)
        paint = _style_mask(obj.style, inside, x, y, SUPERSAMPLE)
        canvas[paint] = np.clip(np.array(COLOURS[obj.colour]) + rng.integers(-12, 13, 3), 0, 255)
        obj.mask = inside.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean((1, 3)) >= 0.5
    image = canvas.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean((1, 3))
    return np.round(image).astype(np.uint8)


def describe(obj: SceneObject, rng: np.random.Generator, synonyms: bool = True) -> str:
    """'striped crimson circle': the style word is left out for solid objects most of the time."""
    colour, shape, style = obj.colour, obj.shape, obj.style
    if synonyms:  # a held-out combination falls back to the canonical words
        pick = lambda w: rng.choice((w,) + SYNONYMS[w]) if w in SYNONYMS and rng.random() < 0.5 else w  # noqa: E731
        colour, shape, style = pick(colour), pick(shape), pick(style)
        words = {colour, shape, style, obj.colour, obj.shape}
        if any(syn in (colour, shape, style) and other in words for syn, other in HELD_OUT_COMBINATIONS):
            colour, shape, style = obj.colour, obj.shape, obj.style
    parts = ([style] if style != "solid" or rng.random() < 0.2 else []) + [colour, shape]
    return " ".join(parts)


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def caption(objects: list[SceneObject], rng: np.random.Generator, synonyms: bool = True) -> str:
    d = [with_article(describe(o, rng, synonyms)) for o in objects]
    pos = [POSITION_PHRASES[o.position] for o in objects]
    templates = TEMPLATES_ONE if len(objects) == 1 else TEMPLATES_TWO
    return templates[rng.integers(len(templates))].format(obj=d[0], obj2=d[-1], pos=pos[0], pos2=pos[-1])


def sample_objects(rng: np.random.Generator, n_objects: int | None = None, held_out: bool = False) -> list[SceneObject]:
    shapes = ALL_SHAPES if held_out else SHAPES
    n = n_objects or int(rng.integers(1, 3))
    if n == 1:
        positions = ["centre"] if rng.random() < 0.4 else [str(rng.choice(list(POSITIONS)))]
    else:
        positions = list(PAIRS[rng.integers(len(PAIRS))])[:: 1 if rng.random() < 0.5 else -1]
    colours = rng.choice(list(COLOURS), size=n, replace=False)
    return [SceneObject(str(rng.choice(shapes)), str(c), str(rng.choice(STYLES)), p,
                        float(rng.uniform(0.15, 0.18) if n == 2 else rng.uniform(0.2, 0.3)))
            for c, p in zip(colours, positions)]


def make_scene(seed: int, n_objects: int | None = None, held_out: bool = False, synonyms: bool = True) -> Scene:
    """One reproducible scene: the same seed gives the same image, caption and masks."""
    rng = np.random.default_rng(seed)
    objects = sample_objects(rng, n_objects, held_out)
    return Scene(render(objects, rng), caption(objects, rng, synonyms), objects)
