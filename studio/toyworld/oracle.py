"""The oracle, every tab's measuring instrument: shape, colour and style of every object in an image, each
object segmented from the background and its crop classified by a small CNN trained on generator scenes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .scenes import ALL_SHAPES, COLOURS, STYLES

CROP = 32
MIN_AREA = 20
COLOUR_NAMES = tuple(COLOURS)


@dataclass
class Reading:
    shape: str
    colour: str
    style: str
    mask: np.ndarray


class OracleNet(nn.Module):
    def __init__(self):
        super().__init__()
        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2))
        self.features = nn.Sequential(block(4, 32), block(32, 64), block(64, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleDict({"shape": nn.Linear(96, len(ALL_SHAPES)), "colour": nn.Linear(96, len(COLOUR_NAMES)),
                                    "style": nn.Linear(96, len(STYLES))})

    def forward(self, x):
        h = self.features(x)
        return {k: head(h) for k, head in self.heads.items()}


def segment(image: np.ndarray, threshold: float = 60.0) -> list[np.ndarray]:
    """Object masks (largest first): pixels far from the border colour, closed and flood-filled."""
    img = torch.tensor(np.asarray(image), dtype=torch.float32)
    border = torch.cat([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = border.median(0).values
    fg = (img - bg).abs().sum(-1) > threshold
    closed = F.max_pool2d(fg[None, None].float(), 5, 1, 2)[0, 0] > 0
    h, w = closed.shape
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w) * closed
    while True:
        grown = F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0] * closed
        if torch.equal(grown, labels):
            break
        labels = grown
    masks = [m.numpy() for m in ((labels == value) & fg for value in labels.unique()[1:]) if m.sum() >= MIN_AREA]
    return sorted(masks, key=lambda m: -m.sum())


def crop(image: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """The object on a neutral background, centred in a square crop: 3 colour channels + mask."""
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()) / 2 + 2
    img = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1) / 127.5 - 1
    m = torch.as_tensor(mask, dtype=torch.float32)[None]
    x = torch.cat([img * F.max_pool2d(m[None], 5, 1, 2)[0], m])[None]
    theta = torch.tensor([[[half / 32, 0, (cx + 0.5) / 32 - 1], [0, half / 32, (cy + 0.5) / 32 - 1]]], dtype=torch.float32)
    grid = F.affine_grid(theta, (1, 4, CROP, CROP), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False)[0]


class Oracle:
    def __init__(self, net: OracleNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path) -> "Oracle":
        net = OracleNet()
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    @torch.no_grad()
    def read(self, image) -> list[Reading]:
        image = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
        masks = segment(image)
        if not masks:
            return []
        out = self.net(torch.stack([crop(image, m) for m in masks]))
        best = {k: v.softmax(-1).argmax(-1).tolist() for k, v in out.items()}
        return [Reading(ALL_SHAPES[best["shape"][i]], COLOUR_NAMES[best["colour"][i]], STYLES[best["style"][i]], m)
                for i, m in enumerate(masks)]

    def presence(self, image, concept: str) -> float:
        """1.0 if some object in the image shows `concept` (a shape, colour or style word), else 0.0."""
        return float(any(concept in (r.shape, r.colour, r.style) for r in self.read(image)))
