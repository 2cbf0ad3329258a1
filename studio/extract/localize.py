"""Find the things in an image without any input: masks from the model's own self-attention.

ConceptExpress-style, in five small steps, all but the first pure functions:
1. `attention_features`: the image is encoded by the VAE, noised to an early timestep and passed
   once through the UNet with an empty prompt, with the Attention tab's capture hooked on
   (studio.attention.capture: the layer outputs are untouched). Self-attention of the finer layers is
   formed from the kept Q/K, averaged over heads and noise draws, resampled to one grid and averaged
   over layers: row i is where pixel i attends, a distribution over the grid.
2. `kl_kmeans`: pixels are clustered by their attention distributions (k-means under KL divergence:
   the centroid of a cluster is the mean of its rows). Deliberately more clusters than objects.
3. `cluster_stats`: per cluster, where its pixels attend (its key map: the centroid), how much of
   that attention stays inside the cluster (an object attends to itself; the background attends to
   the objects), how much of the image border it holds, and how much the end-of-text token's
   cross-attention covers it (ConceptExpress' saliency).
4. `select_concepts`: background clusters (holding the border) are dropped, the others are cut into
   connected parts, parts that do not attend to themselves are dropped, parts seeing the same
   object (core and rim) merge; with `count` the most salient `count` are kept.
5. `concept_masks`: a concept's mask is its key map near the cluster (sharper than the cluster
   itself, whose rim pixels attend to the object too) above `share` of the cluster's mean,
   upsampled and, with `refine`, snapped to the image's colour edges by a joint bilateral filter.

Measured on the bundled toy model (bench/bench_extract_localize.py): the end-of-text map of an
empty prompt does not single out the objects there (its mean over objects is ~0.9 of its image
mean), so ranking defaults to self-attention kept inside a cluster; "eot" is an option.

`prepare_image` turns any upload (path, PIL, array; alpha; any size) into the model's square RGB
input (studio.images' `fit_mask` applies the same crop and resize to a mask), `check_masks` refuses
mask sets that cannot be trained on (none, empty, whole image, overlapping).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cmp_to_key

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import models
from ..attention.any_image import encoded, noised, noising
from ..attention.capture import capture
from ..attention.tokens import sequence_length
from ..errors import StudioError
from ..generation import parse_seed
from ..images import crop_box, load_rgb, open_image, square

DEFAULT_TIMESTEP = 200
DEFAULT_CLUSTERS = 6
GRID_LIMIT = 32          # self-attention is clustered on at most a 32x32 grid (1024 x 1024 rows)
MAX_CONCEPTS = 8


# -- the image ---------------------------------------------------------------------------------------
def prepare_image(image, size: int) -> tuple[np.ndarray, list[str]]:
    """The model's input: (size x size x 3 uint8 RGB, notes on what was changed). Any upload `load_rgb` reads
    (transparency on white), centre-cropped to a square (the crop `fit_mask` applies to masks), resized."""
    size = int(size)
    if size < 8:
        raise StudioError(f"the model's image size must be at least 8 (got {size})")
    im, note = load_rgb(image)
    notes = [note] if note else []
    (w, h), side = im.size, min(im.size)
    if w != h:
        box = crop_box(w, h)
        notes.append(f"the {w}x{h} image was centre-cropped to {side}x{side} "
                     f"(pixels {box[0]}..{box[2] - 1} across, {box[1]}..{box[3] - 1} down): the model works on squares")
    if side != size:
        notes.append(f"resized from {side}x{side} to the model's {size}x{size}")
    im = square(im, size, Image.BICUBIC if side < size else Image.LANCZOS)
    return np.asarray(im, dtype=np.uint8).copy(), notes


def _to_image_size(soft: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(k, s, s) maps on the prepared square back onto a height x width image (0 outside the crop)."""
    left, top, right, bottom = crop_box(width, height)
    inner = F.interpolate(soft[:, None], size=(bottom - top, right - left), mode="bilinear", align_corners=False)[:, 0]
    out = soft.new_zeros((soft.shape[0], height, width))
    out[:, top:bottom, left:right] = inner
    return out


# -- checks ------------------------------------------------------------------------------------------
def check_masks(masks, image_size, *, minimum: int = 1, max_cover: float = 0.95, max_overlap: float = 0.5,
                min_pixels: int = 4) -> list[str]:
    """Refuse masks that cannot be trained on (StudioError says which and what to do); returns notes.

    image_size: (height, width). Refused: no mask; fewer than `minimum` masks; a mask of another
    size; an empty (or nearly: < `min_pixels`) mask; a mask covering more than `max_cover` of the
    image; two masks sharing more than `max_overlap` of the smaller one. Smaller overlaps pass with
    a note (the shared pixels are trained as both concepts).
    """
    try:
        height, width = (int(v) for v in tuple(image_size)[:2])
    except (TypeError, ValueError):
        raise StudioError(f"image_size must be (height, width), got {image_size!r}") from None
    masks = list(masks or [])
    if not masks:
        raise StudioError("no masks: find concepts, click objects (Segment Anything) or draw masks first")
    if len(masks) < minimum:
        raise StudioError(f"only {len(masks)} mask{'s' if len(masks) != 1 else ''}: this needs at least {minimum} "
                          "(one per thing to pull out of the image); add masks, or teach a single concept "
                          "in the Customize tab")
    arrays = []
    for i, m in enumerate(masks, 1):
        a = np.asarray(m)
        if a.ndim != 2:
            raise StudioError(f"mask {i} is not a 2-D image (shape {a.shape})")
        if a.shape != (height, width):
            raise StudioError(f"mask {i} is {a.shape[1]}x{a.shape[0]} but the image is {width}x{height}: "
                              "masks must be drawn on the image they go with")
        a = a > (127 if a.dtype == np.uint8 else 0.5) if a.dtype != bool else a
        arrays.append(a)
    total = height * width
    notes = []
    for i, a in enumerate(arrays, 1):
        n = int(a.sum())
        if n < min_pixels:
            raise StudioError(f"mask {i} is empty: draw or click the object it should hold, or remove it")
        if n > max_cover * total:
            raise StudioError(f"mask {i} covers {100 * n / total:.0f}% of the image: a mask should hold one "
                              "thing, not the whole picture")
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            shared = int((arrays[i] & arrays[j]).sum())
            if not shared:
                continue
            share = shared / min(arrays[i].sum(), arrays[j].sum())
            if share > max_overlap:
                raise StudioError(f"masks {i + 1} and {j + 1} overlap ({100 * share:.0f}% of the smaller one): "
                                  "each mask should hold a different thing; erase the shared part from one")
            notes.append(f"masks {i + 1} and {j + 1} share {shared} pixels ({100 * share:.0f}% of the smaller)")
    if len(arrays) == 1:
        notes.append("one mask: one concept is learned (extraction shines with several)")
    return notes


# -- 1. attention of the image -----------------------------------------------------------------------
@dataclass
class AttentionFeatures:
    """Self-attention of one image, aggregated over layers and heads on one grid."""
    affinity: torch.Tensor        # (N, N), N = h*w: row i is where pixel i attends (sums to 1)
    grid: tuple[int, int]         # (h, w)
    eot: torch.Tensor             # (h, w): the end-of-text token's cross-attention (mean over layers)
    layers: list[str]             # the self-attention layers used
    timestep: int
    seconds: float = 0.0


def _resample_rows(a: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """An (Ns, Ns) row-stochastic attention on grid `src` as an (Nd, Nd) one on grid `dst`."""
    if src == dst:
        return a
    (sh, sw), (dh, dw) = src, dst
    mode = "bilinear" if dh >= sh else "area"
    kw = dict(align_corners=False) if mode == "bilinear" else {}
    # keys: each row is a distribution; resample and renormalise
    a = F.interpolate(a.reshape(-1, 1, sh, sw), size=(dh, dw), mode=mode, **kw).reshape(sh * sw, dh * dw)
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    # queries: each key's column is a map over the query pixels
    a = F.interpolate(a.T.reshape(-1, 1, sh, sw), size=(dh, dw), mode=mode, **kw).reshape(dh * dw, dh * dw).T
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


def aggregate_self_attention(qk: dict[str, tuple[torch.Tensor, torch.Tensor]],
                             geometry: dict[str, tuple[int, int]], grid: tuple[int, int] | None = None,
                             min_side: int | None = None) -> tuple[torch.Tensor, tuple[int, int], list[str]]:
    """Mean over layers (and heads and batch rows) of softmax(q K^T), resampled to `grid`.

    qk: layer name -> (q pre-scaled, k), each (B, H, N, d), as AttentionSession keeps them.
    grid: default the finest layer, at most GRID_LIMIT per side. Layers coarser than `min_side`
    (default half the grid) are left out: at 4x4 everything attends to everything.
    """
    if not qk:
        raise StudioError("no self-attention was captured: does this model have self-attention layers?")
    if grid is None:
        h, w = max((geometry[n] for n in qk), key=lambda s: s[0] * s[1])
        while h > GRID_LIMIT or w > GRID_LIMIT:
            h, w = (h + 1) // 2, (w + 1) // 2
        grid = (h, w)
    min_side = max(1, grid[0] // 2) if min_side is None else min_side
    acc, used = None, []
    for name, (q, k) in qk.items():
        h, w = geometry[name]
        if h < min_side:
            continue
        q, k = q.float(), k.float()
        probs = 0
        for b in range(q.shape[0]):          # one row and one head at a time: (N, N) each, never (B, H, N, N)
            for head in range(q.shape[1]):
                probs = probs + (q[b, head] @ k[b, head].T).softmax(-1)
        probs = probs / (q.shape[0] * q.shape[1])
        a = _resample_rows(probs, (h, w), grid)
        acc = a if acc is None else acc + a
        used.append(name)
    if acc is None:
        raise StudioError(f"no self-attention layer is at least {min_side}x{min_side}")
    acc = acc / len(used)
    return acc / acc.sum(1, keepdim=True), grid, used


def attention_features(manager, picture: np.ndarray, *, timestep: int = DEFAULT_TIMESTEP, seed=0, repeats: int = 2,
                       prompt: str = "") -> AttentionFeatures:
    """One UNet pass on the noised image with self-attention (and cross-attention) captured.

    picture: the model's square input (from `prepare_image`). The prompt is empty by default (what
    the model does with no words); its last token is the end-of-text token whose map is `eot`.
    """
    seed = parse_seed(seed)
    with manager.job():
        pipe, model = manager.pipe, models.of(manager.pipe)
        timestep, repeats = noising(pipe, timestep, repeats)
        size = model.default_size
        picture = np.asarray(picture)
        if picture.shape != (size, size, 3) or picture.dtype != np.uint8:
            raise StudioError(f"the image must be the model's {size}x{size} RGB input: pass it through prepare_image")
        start = time.perf_counter()
        tokens = sequence_length(pipe.tokenizer, prompt)
        with capture(manager, per_step=False, tokens=tokens, self_steps=(0,)) as session, torch.no_grad():
            noisy, t = noised(model, picture, timestep, repeats, seed)
            session.begin(False, noisy.shape[-2:])
            manager.check_stop()
            model.predict(noisy, t, encoded(model, [prompt], repeats))
        kept = {name: pair for (_, name), pair in session.self_qk.items()}
        affinity, grid, used = aggregate_self_attention(kept, session.geometry)   # on the model's device
        affinity = affinity.cpu()
        kept.clear()
        session.self_qk.clear()
        eot = session.cross.maps(size=grid[0], layers=None)[:, tokens - 1].mean(0).cpu()  # (h, w)
        if eot.shape != grid:
            eot = F.interpolate(eot[None, None], size=grid, mode="bilinear", align_corners=False)[0, 0]
    return AttentionFeatures(affinity, grid, eot, used, timestep, time.perf_counter() - start)


# -- 2. clustering -----------------------------------------------------------------------------------
def kl_kmeans(p: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 4, iters: int = 50):
    """k-means of the rows of `p` (distributions) under KL(row || centroid): (labels (N,), centroids (k, N)).

    The centroid minimising the summed KL of its members is their mean, so this is Lloyd's
    algorithm with KL as the distance; k-means++ seeding in KL; the best of `restarts` runs.
    """
    n = p.shape[0]
    k = max(1, min(int(k), n))
    p = p.double()
    logp = p.clamp_min(1e-30).log()
    neg_entropy = (p * logp).sum(1)
    g = torch.Generator().manual_seed(seed)

    def distances(c):
        return neg_entropy[:, None] - p @ c.clamp_min(1e-30).log().T  # KL(p_i || c_j), (N, k)

    best = None
    for _ in range(max(1, restarts)):
        idx = [int(torch.randint(n, (1,), generator=g))]
        for _ in range(1, k):
            d = distances(p[idx]).min(1).values.clamp_min(0)
            idx.append(int(torch.multinomial(d + 1e-12, 1, generator=g)) if d.sum() > 0 else
                       int(torch.randint(n, (1,), generator=g)))
        c = p[idx]
        for _ in range(iters):
            labels = distances(c).argmin(1)
            new = torch.stack([p[labels == j].mean(0) if (labels == j).any() else c[j] for j in range(k)])
            if torch.allclose(new, c, atol=1e-9):
                break
            c = new
        d = distances(c)
        labels = d.argmin(1)
        cost = float(d.gather(1, labels[:, None]).sum())
        if best is None or cost < best[0]:
            best = (cost, labels, c)
    labels, c = best[1], best[2]
    # drop empty clusters, relabel 0..k'-1
    keep = [j for j in range(k) if (labels == j).any()]
    remap = torch.full((k,), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    return remap[labels], c[keep].float()


# -- 3. what each cluster is -------------------------------------------------------------------------
@dataclass(eq=False)
class Cluster:
    members: torch.Tensor      # (h, w) bool: the pixels of the cluster
    keys: torch.Tensor         # (h, w): where they attend (the centroid), sums to 1
    self_ratio: float          # attention kept inside the cluster / the cluster's share of the image
    border: float              # share of the image border the cluster holds
    area: float                # share of the image
    eot: float                 # mean end-of-text attention inside / mean over the image
    merged: tuple[int, ...] = ()
    edge: float = 0.0          # share of the cluster's own pixels that lie on the image border

    def key_map(self, reach: int = 1) -> torch.Tensor:
        """Where the cluster attends, on and next to it (`reach` cells): the key map above its floor,
        0 farther away, scaled so that its mean over the cluster's own pixels is 1."""
        k = self.keys - self.keys.min()
        k = torch.where(dilate(self.members, reach), k, torch.zeros(()))
        return k / k[self.members].mean().clamp_min(1e-12)

    def key_mask(self, share: float = 0.8, reach: int = 1) -> torch.Tensor:
        """The pixels that get at least `share` of the attention the cluster's pixels get on average."""
        return self.key_map(reach) >= share


def dilate(mask: torch.Tensor, cells: int) -> torch.Tensor:
    if cells <= 0:
        return mask
    return F.max_pool2d(mask[None, None].float(), 2 * cells + 1, 1, cells)[0, 0].bool()


def border_cells(h: int, w: int) -> torch.Tensor:
    b = torch.zeros(h, w, dtype=torch.bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a bool (h, w) mask: 0 outside, 1.. inside (label propagation)."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w), torch.zeros(()))
    while True:
        grown = torch.where(mask, F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0], torch.zeros(()))
        if torch.equal(grown, labels):
            break
        labels = grown
    values = labels[mask].unique()
    out = torch.zeros((h, w), dtype=torch.long)
    for i, v in enumerate(values.tolist(), 1):
        out[labels == v] = i
    return out


def _cluster(features: AttentionFeatures, m: torch.Tensor, merged: tuple[int, ...]) -> Cluster:
    """Statistics of the pixels `m` ((N,) bool) of the attention grid."""
    h, w = features.grid
    keys = features.affinity[m].mean(0)
    area = float(m.float().mean())
    border = border_cells(h, w).flatten()
    eot = features.eot.flatten()
    on_border = float((m & border).sum())
    return Cluster(m.reshape(h, w), keys.reshape(h, w), float(keys[m].sum()) / max(area, 1e-12),
                   on_border / float(border.sum()), area, float(eot[m].mean() / eot.mean().clamp_min(1e-12)),
                   merged, on_border / max(float(m.sum()), 1.0))


def cluster_stats(features: AttentionFeatures, labels: torch.Tensor) -> list[Cluster]:
    """One Cluster per label of `labels` ((N,) ints 0..k-1 on the attention grid)."""
    return [_cluster(features, labels == j, (j,)) for j in range(int(labels.max()) + 1) if (labels == j).any()]


# -- 4. which clusters are concepts ------------------------------------------------------------------
def _merge(a: Cluster, b: Cluster, features: AttentionFeatures) -> Cluster:
    return _cluster(features, (a.members | b.members).flatten(), a.merged + b.merged)


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def _same_thing(a: Cluster, b: Cluster, share: float, merge_iou: float, merge_inside: float) -> bool:
    ka, kb = a.key_mask(share), b.key_mask(share)
    if _iou(ka, kb) >= merge_iou:
        return True
    inside = lambda k, m: float((k & m).sum()) / max(float(k.sum()), 1.0)  # noqa: E731
    return max(inside(ka, b.members), inside(kb, a.members)) >= merge_inside


def select_concepts(features: AttentionFeatures, labels: torch.Tensor, *, count: int | None = None,
                    share: float = 0.8, min_self: float = 1.4, max_border: float = 0.2, max_edge: float = 0.3,
                    merge_iou: float = 0.4, merge_inside: float = 0.5, split: bool = True, min_part: float = 0.02,
                    saliency: str = "self") -> list[Cluster]:
    """The clusters (of `labels`, (N,) on the attention grid) that are things, most salient first.

    Background: the cluster holding most of the border, any cluster holding more than `max_border`
    of it, and any covering half the image. With `split`, the other clusters are cut into their
    connected parts (k-means may put two separate things in one cluster), parts under `min_part`
    of the image dropped. Strips along the border (more than `max_edge` of their pixels on it: the
    UNet's padding makes such bands) are background too. A thing's pixels keep their attention on
    it (`self_ratio` >= `min_self`; the background attends to the things instead). Two things are
    one thing seen twice (its core and its rim) and merge when their key masks (`share` of their
    peak) overlap by IoU >= `merge_iou`, or when `merge_inside` of one's key mask lies in the other.
    Ranking: `saliency` "self" (self-attention kept inside), "eot" (end-of-text cross-attention, as
    ConceptExpress) or "both" (their product). With `count`, the best `count` are kept, taking
    clusters under `min_self` too if there are not enough.
    """
    clusters = cluster_stats(features, labels)
    if not clusters:
        return []
    background = max(range(len(clusters)), key=lambda j: (clusters[j].border, clusters[j].area))
    candidates = [c for j, c in enumerate(clusters) if j != background and c.border <= max_border and c.area < 0.5]
    if split:
        parts = []
        for c in candidates:
            pieces = components(c.members)
            if int(pieces.max()) <= 1:
                parts.append(c)
                continue
            for i in range(1, int(pieces.max()) + 1):
                m = pieces == i
                if float(m.float().mean()) >= min_part:
                    parts.append(_cluster(features, m.flatten(), c.merged))
        candidates = parts
    candidates = [c for c in candidates if c.edge <= max_edge]
    things = [c for c in candidates if c.self_ratio >= min_self]
    if count is not None and len(things) < count:   # asked for more: take the best of the rest too
        rest = sorted((c for c in candidates if all(c is not t for t in things)), key=lambda c: -c.self_ratio)
        things += rest[:count - len(things)]
    merged = True
    while merged and len(things) > 1:
        merged = False
        for i in range(len(things)):
            for j in range(i + 1, len(things)):
                if _same_thing(things[i], things[j], share, merge_iou, merge_inside):
                    things[i] = _merge(things[i], things[j], features)
                    del things[j]
                    merged = True
                    break
            if merged:
                break

    def score(c: Cluster) -> float:
        return {"self": c.self_ratio, "eot": c.eot, "both": c.self_ratio * c.eot}[saliency]

    things.sort(key=score, reverse=True)
    return things[:count] if count is not None else things


# -- 5. masks ----------------------------------------------------------------------------------------
def joint_bilateral(maps: torch.Tensor, guide: torch.Tensor, *, radius: int = 5, sigma_space: float = 3.0,
                    sigma_colour: float = 0.1, iterations: int = 2) -> torch.Tensor:
    """Smooth (k, H, W) maps with weights from a (3, H, W) guide image in 0..1 (joint bilateral
    filter): a pixel averages the maps of nearby pixels of its own colour, so the maps' edges move to
    the guide's edges. Radius and sigmas are in pixels of the maps (tuned at 4 pixels per attention cell)."""
    k, hh, ww = maps.shape
    size = 2 * radius + 1
    ys, xs = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
    spatial = torch.exp(-(xs ** 2 + ys ** 2).float() / (2 * sigma_space ** 2)).flatten()  # (S,)
    g = F.pad(guide[None], (radius,) * 4, mode="replicate")
    patches = F.unfold(g, size).reshape(3, size * size, hh * ww)                      # (3, S, HW)
    centre = guide.reshape(3, 1, hh * ww)
    colour = torch.exp(-((patches - centre) ** 2).sum(0) / (2 * sigma_colour ** 2))     # (S, HW)
    weights = spatial[:, None] * colour
    weights = weights / weights.sum(0, keepdim=True)
    out = maps
    for _ in range(iterations):
        p = F.unfold(F.pad(out[None], (radius,) * 4, mode="replicate"), size).reshape(k, size * size, hh * ww)
        out = (p * weights[None]).sum(1).reshape(k, hh, ww)
    return out


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """Pixels not reachable from the border through the mask's complement become part of the mask."""
    outside = ~mask
    reach = torch.zeros_like(mask)
    reach[0], reach[-1], reach[:, 0], reach[:, -1] = outside[0], outside[-1], outside[:, 0], outside[:, -1]
    while True:
        grown = F.max_pool2d(reach[None, None].float(), 3, 1, 1)[0, 0].bool() & outside
        if torch.equal(grown, reach):
            break
        reach = grown
    return ~reach


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a bool mask."""
    if not mask.any():
        return mask
    parts = components(mask)
    return parts == torch.bincount(parts[mask]).argmax()


WORK_CELL = 4   # masks are drawn (and refined) at 4 pixels per attention cell, then resized to the image


def concept_masks(things: list[Cluster], size: int, *, share: float = 0.8, guide: torch.Tensor | None = None,
                  fill: bool = True, reach: int = 1) -> torch.Tensor:
    """(k, size, size) soft maps in 0..1 of the things, exclusive where they meet: thing i holds the
    pixels where soft[i] >= 0.5.

    A thing's mask is its key map (`Cluster.key_map`) at or above `share`, upsampled bilinearly to
    4 pixels per attention cell (with `guide`, a (3, H, W) image in 0..1, filtered edge-aware
    there); where two things claim a pixel the higher map wins; its largest connected part is kept
    and (`fill`) holes are filled; the result is resized to `size`.
    """
    if not things:
        return torch.zeros((0, size, size))
    h, w = things[0].members.shape
    work = (min(size, WORK_CELL * h), min(size, WORK_CELL * w))
    maps = torch.stack([(c.key_map(reach) * (0.5 / share)).clamp(max=1.0) for c in things])
    maps = F.interpolate(maps[:, None], size=work, mode="bilinear", align_corners=False)[:, 0]
    if guide is not None:
        if tuple(guide.shape[-2:]) != work:
            guide = F.interpolate(guide[None].float(), size=work, mode="area")[0]
        maps = joint_bilateral(maps, guide)
    win = maps.argmax(0)
    out = []
    for i in range(len(things)):
        m = largest_component((maps[i] >= 0.5) & (win == i))
        if fill:
            m = fill_holes(m)
        out.append(torch.where(m, torch.ones(()), maps[i].clamp(max=0.49)))
    out = torch.stack(out)
    if work != (size, size):
        out = F.interpolate(out[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return out


def left_to_right(masks: list[np.ndarray]) -> list[int]:
    """Order masks left to right by centroid; nearly the same column (within 1/8 of the width): top first."""
    h, w = masks[0].shape
    cents = []
    for m in masks:
        ys, xs = np.nonzero(m)
        cents.append((xs.mean() if len(xs) else w, ys.mean() if len(ys) else h))

    def cmp(i, j):
        (xi, yi), (xj, yj) = cents[i], cents[j]
        if abs(xi - xj) > w / 8:
            return -1 if xi < xj else 1
        return -1 if yi < yj else 1 if yi > yj else 0

    return sorted(range(len(masks)), key=cmp_to_key(cmp))


# -- the whole method --------------------------------------------------------------------------------
@dataclass
class Localization:
    masks: list[np.ndarray]                 # bool, at the given image's resolution, left to right
    picture: np.ndarray                     # the model's input the masks were found on
    clusters: torch.Tensor                  # (h, w) cluster labels on the attention grid
    things: list[Cluster]                   # the selected clusters, in mask order
    features: AttentionFeatures
    notes: list[str] = field(default_factory=list)


def localize(manager, image, *, count: int | None = None, timestep: int = DEFAULT_TIMESTEP,
             clusters: int = DEFAULT_CLUSTERS, seed=0, repeats: int = 2, prompt: str = "", share: float = 0.8,
             min_self: float = 1.4, saliency: str = "self", refine: bool = True, split: bool = True) -> Localization:
    """`find_concepts` with everything it saw (clusters, scores, notes): for the UI and benchmarks."""
    if count is not None:
        try:
            count = int(count)
        except (TypeError, ValueError):
            raise StudioError(f"the number of concepts must be a whole number (got {count!r})") from None
        if not 1 <= count <= MAX_CONCEPTS:
            raise StudioError(f"the number of concepts must be from 1 to {MAX_CONCEPTS} (got {count})")
    if saliency not in ("self", "eot", "both"):
        raise StudioError(f"saliency must be 'self', 'eot' or 'both' (got {saliency!r})")
    clusters = int(clusters)
    if not 2 <= clusters <= 16:
        raise StudioError(f"clusters must be from 2 to 16 (got {clusters})")
    original = open_image(image)
    width, height = original.size
    size = models.of(manager.pipe).default_size
    picture, notes = prepare_image(original, size)
    features = attention_features(manager, picture, timestep=timestep, seed=seed, repeats=repeats, prompt=prompt)
    k = max(clusters, (count or 0) + 2)
    labels, _ = kl_kmeans(features.affinity, k, seed=parse_seed(seed))
    things = select_concepts(features, labels, count=count, share=share, min_self=min_self, split=split,
                             saliency=saliency)
    if not things:
        raise StudioError("no object found: every part of the image attends like background. Draw the masks, "
                          "click the objects (Segment Anything), or set the number of concepts to look for")
    guide = torch.from_numpy(picture).permute(2, 0, 1).float() / 255 if refine else None
    soft = concept_masks(things, size, share=share, guide=guide)
    if (width, height) != (size, size):
        soft = _to_image_size(soft, height, width)
    masks = [(s >= 0.5).numpy() for s in soft]
    keep = [i for i, m in enumerate(masks) if m.sum() >= max(4, 0.002 * m.size)]
    if len(keep) < len(masks):
        notes.append(f"{len(masks) - len(keep)} found region(s) were too small to keep")
    order = [keep[i] for i in left_to_right([masks[j] for j in keep])] if keep else []
    if not order:
        raise StudioError("no object found: the regions found were too small. Draw the masks or click the objects")
    if count is not None and len(order) < count:
        notes.append(f"asked for {count} concepts, found {len(order)}")
    return Localization([masks[i] for i in order], picture, labels.reshape(features.grid),
                        [things[i] for i in order], features, notes)


def find_concepts(manager, image, *, count: int | None = None, timestep: int = DEFAULT_TIMESTEP,
                  clusters: int = DEFAULT_CLUSTERS, seed=0, repeats: int = 2, prompt: str = "",
                  refine: bool = True, **options) -> list[np.ndarray]:
    """Masks (bool, at `image`'s resolution, left to right) of the things in `image`, found from the
    model's self-attention with no input. `count`: how many things to return (default: automatic).
    StudioError if nothing is found. See `localize` for the options and the method."""
    return localize(manager, image, count=count, timestep=timestep, clusters=clusters, seed=seed, repeats=repeats,
                    prompt=prompt, refine=refine, **options).masks
