"""Masks of the things in an image from the model's own self-attention (ConceptExpress-style): pixels
clustered by where they attend. Ranked by self-attention: on the toy model the end-of-text map is flat."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cmp_to_key
from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .. import models
from ..capture import capture, encoded, noised, noising
from ..checks import whole
from ..errors import StudioError
from ..generation import parse_seed
from ..images import MIN_SIDE, crop_box, load_rgb, open_image, square
from ..tokenizer import sequence_length

DEFAULT_TIMESTEP = 200
DEFAULT_CLUSTERS = 6
GRID_LIMIT = 32          # self-attention is clustered on at most a 32x32 grid
MAX_CONCEPTS = 8
WORK_CELL = 4            # masks are drawn (and refined) at 4 pixels per attention cell


def prepare_image(image, size: int) -> tuple[np.ndarray, list[str]]:
    """The model's square RGB input (cropped as `fit_mask` crops masks) and notes on what changed."""
    size = int(size)
    if size < MIN_SIDE:
        raise StudioError(f"the model's image size must be at least {MIN_SIDE} (got {size})")
    im, note = load_rgb(image)
    notes = [note] if note else []
    (w, h), side = im.size, min(im.size)
    if w != h:
        left, top, right, bottom = crop_box(w, h)
        notes.append(f"the {w}x{h} image was centre-cropped to {side}x{side} "
                     f"(pixels {left}..{right - 1} across, {top}..{bottom - 1} down): the model works on squares")
    if side != size:
        notes.append(f"resized from {side}x{side} to the model's {size}x{size}")
    im = square(im, size, Image.BICUBIC if side < size else Image.LANCZOS)
    return np.array(im, dtype=np.uint8), notes


def check_masks(masks, image_size, *, minimum: int = 1) -> list[str]:
    """Refuse masks (on an image of (height, width)) that cannot be trained on; notes on smaller overlaps."""
    height, width = (int(v) for v in tuple(image_size)[:2])
    masks = list(masks or [])
    if not masks:
        raise StudioError("no masks: find concepts, click objects (Segment Anything) or draw masks first")
    if len(masks) < minimum:
        raise StudioError(f"only {len(masks)} mask{'s' if len(masks) != 1 else ''}: this needs at least {minimum} "
                          "(one per thing); add masks, or teach one concept in the Customize tab")
    arrays, total = [], height * width
    for i, m in enumerate(masks, 1):
        a = np.asarray(m)
        if a.ndim != 2:
            raise StudioError(f"mask {i} is not a 2-D image (shape {a.shape})")
        if a.shape != (height, width):
            raise StudioError(f"mask {i} is {a.shape[1]}x{a.shape[0]} but the image is {width}x{height}: "
                              "masks must be drawn on the image they go with")
        a = a if a.dtype == bool else a > (127 if a.dtype == np.uint8 else 0.5)
        if a.sum() < 4:
            raise StudioError(f"mask {i} is empty: draw or click the object it should hold, or remove it")
        if a.sum() > 0.95 * total:
            raise StudioError(f"mask {i} covers {100 * a.sum() / total:.0f}% of the image: it should hold one thing")
        arrays.append(a)
    notes = []
    for (i, a), (j, b) in combinations(enumerate(arrays, 1), 2):
        shared = int((a & b).sum())
        if shared:
            share = shared / min(a.sum(), b.sum())
            if share > 0.5:
                raise StudioError(f"masks {i} and {j} overlap ({100 * share:.0f}% of the smaller one): "
                                  "erase the shared part from one")
            notes.append(f"masks {i} and {j} share {shared} pixels ({100 * share:.0f}% of the smaller)")
    if len(arrays) == 1:
        notes.append("one mask: one concept is learned (extraction shines with several)")
    return notes


@dataclass
class AttentionFeatures:
    affinity: torch.Tensor        # (N, N), N = h*w: row i is where pixel i attends (sums to 1)
    grid: tuple[int, int]         # (h, w)
    eot: torch.Tensor             # (h, w): the end-of-text token's cross-attention
    layers: list[str]             # the self-attention layers used
    timestep: int


def _resize(maps: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    kw = dict(align_corners=False) if mode == "bilinear" else {}
    flat = F.interpolate(maps.reshape(-1, 1, *maps.shape[-2:]), size=size, mode=mode, **kw)
    return flat.reshape(*maps.shape[:-2], *size)


def _resample_rows(a: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """An (Ns, Ns) row-stochastic attention on grid `src` as an (Nd, Nd) one on grid `dst`: keys, then queries."""
    if src == dst:
        return a
    mode, n = "bilinear" if dst[0] >= src[0] else "area", dst[0] * dst[1]
    a = _resize(a.reshape(-1, *src), dst, mode).reshape(-1, n)
    a = a / a.sum(1, keepdim=True).clamp_min(1e-12)
    a = _resize(a.T.reshape(-1, *src), dst, mode).reshape(n, n).T
    return a / a.sum(1, keepdim=True).clamp_min(1e-12)


def aggregate_self_attention(qk: dict, geometry: dict) -> tuple[torch.Tensor, tuple[int, int], list[str]]:
    """Mean softmax(q K^T) (q pre-scaled) of the layers at least half the finest grid up to GRID_LIMIT, on it."""
    if not qk:
        raise StudioError("no self-attention was captured: does this model have self-attention layers?")
    h, w = max((geometry[n] for n in qk), key=lambda s: s[0] * s[1])
    while h > GRID_LIMIT or w > GRID_LIMIT:
        h, w = (h + 1) // 2, (w + 1) // 2
    grid, min_side = (h, w), max(1, h // 2)
    acc, used = 0, []
    for name, (q, k) in qk.items():
        if geometry[name][0] >= min_side:   # one (N, N) map at a time, never (B, H, N, N)
            rows = zip(q.float().flatten(0, 1), k.float().flatten(0, 1))
            probs = sum((qi @ ki.T).softmax(-1) for qi, ki in rows)
            acc = acc + _resample_rows(probs / (q.shape[0] * q.shape[1]), tuple(geometry[name]), grid)
            used.append(name)
    if not used:
        raise StudioError(f"no self-attention layer is at least {min_side}x{min_side}")
    acc = acc / len(used)
    return acc / acc.sum(1, keepdim=True), grid, used


def attention_features(manager, picture: np.ndarray, *, timestep: int = DEFAULT_TIMESTEP, seed=0, repeats: int = 2,
                       prompt: str = "") -> AttentionFeatures:
    """One UNet pass on the noised `picture` (from `prepare_image`), its attention captured."""
    seed = parse_seed(seed)
    with manager.job():
        pipe, model = manager.pipe, models.of(manager.pipe)
        timestep, repeats = noising(pipe, timestep, repeats)
        size = model.default_size
        picture = np.asarray(picture)
        if picture.shape != (size, size, 3) or picture.dtype != np.uint8:
            raise StudioError(f"the image must be the model's {size}x{size} RGB input: pass it through prepare_image")
        tokens = sequence_length(pipe.tokenizer, prompt)
        with capture(manager, per_step=False, tokens=tokens, self_steps=(0,)) as session, torch.no_grad():
            noisy, t = noised(model, picture, timestep, repeats, seed)
            session.begin(False, noisy.shape[-2:])
            manager.check_stop()
            model.predict(noisy, t, encoded(model, [prompt], repeats))
        affinity, grid, used = aggregate_self_attention({n: qk for (_, n), qk in session.self_qk.items()},
                                                        session.geometry)
        session.self_qk.clear()
        eot = session.cross.maps(size=grid[0], layers=None)[:, tokens - 1].mean(0).cpu()  # (h, w)
        if eot.shape != grid:
            eot = _resize(eot, grid)
    return AttentionFeatures(affinity.cpu(), grid, eot, used, timestep)


def kl_kmeans(p: torch.Tensor, k: int, *, seed: int = 0, restarts: int = 4, iters: int = 50):
    """(labels, centroids) of k-means (Lloyd, k-means++ seeding, best of `restarts`) of p's rows under KL."""
    n = p.shape[0]
    k = max(1, min(int(k), n))
    p = p.double()
    neg_entropy = (p * p.clamp_min(1e-30).log()).sum(1)
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
    used, labels = best[1].unique(return_inverse=True)   # empty clusters dropped, relabelled 0..k'-1
    return labels, best[2][used].float()


@dataclass(eq=False)
class Cluster:
    members: torch.Tensor      # (h, w) bool: the pixels of the cluster
    keys: torch.Tensor         # (h, w): where they attend (the centroid), sums to 1
    self_ratio: float          # attention kept inside the cluster / the cluster's share of the image
    border: float              # share of the image border the cluster holds
    area: float                # share of the image
    eot: float                 # mean end-of-text attention inside / mean over the image
    edge: float                # share of the cluster's own pixels that lie on the image border

    def key_map(self) -> torch.Tensor:
        """Where the cluster attends on and next to it, above its floor, mean 1 over its pixels."""
        near = F.max_pool2d(self.members[None, None].float(), 3, 1, 1)[0, 0].bool()
        k = torch.where(near, self.keys - self.keys.min(), torch.zeros(()))
        return k / k[self.members].mean().clamp_min(1e-12)


def border_cells(h: int, w: int) -> torch.Tensor:
    b = torch.zeros(h, w, dtype=torch.bool)
    b[0], b[-1], b[:, 0], b[:, -1] = True, True, True, True
    return b


def components(mask: torch.Tensor) -> torch.Tensor:
    """8-connected component labels of a bool mask: 0 outside, 1.. inside."""
    h, w = mask.shape
    labels = torch.where(mask, torch.arange(1, h * w + 1, dtype=torch.float32).reshape(h, w), torch.zeros(()))
    while True:
        grown = torch.where(mask, F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0], torch.zeros(()))
        if torch.equal(grown, labels):
            break
        labels = grown
    out = torch.zeros((h, w), dtype=torch.long)
    out[mask] = labels[mask].unique(return_inverse=True)[1] + 1
    return out


def _cluster(features: AttentionFeatures, m: torch.Tensor) -> Cluster:
    (h, w), m = features.grid, m.flatten()
    keys, area = features.affinity[m].mean(0), float(m.float().mean())
    border, eot = border_cells(h, w).flatten(), features.eot.flatten()
    on_border = float((m & border).sum())
    return Cluster(m.reshape(h, w), keys.reshape(h, w), float(keys[m].sum()) / max(area, 1e-12),
                   on_border / float(border.sum()), area, float(eot[m].mean() / eot.mean().clamp_min(1e-12)),
                   on_border / max(float(m.sum()), 1.0))


def _same_thing(a: Cluster, b: Cluster, share: float) -> bool:
    """Key masks with IoU 0.4, or half of one inside the other: one thing's core and rim."""
    ka, kb = a.key_map() >= share, b.key_map() >= share
    if float((ka & kb).sum()) / max(float((ka | kb).sum()), 1.0) >= 0.4:
        return True
    inside = lambda k, m: float((k & m).sum()) / max(float(k.sum()), 1.0)  # noqa: E731
    return max(inside(ka, b.members), inside(kb, a.members)) >= 0.5


def select_concepts(features: AttentionFeatures, labels: torch.Tensor, *, count: int | None = None, share: float = 0.8,
                    min_self: float = 1.4, saliency: str = "self") -> list[Cluster]:
    """The clusters' connected parts that are things, most salient first: not the background, strips along the
    border (the UNet's padding), parts under 2% or what does not attend to itself (`min_self`)."""
    clusters = [_cluster(features, labels == j) for j in labels.unique().tolist()]
    if not clusters:
        return []
    background = max(clusters, key=lambda c: (c.border, c.area))
    candidates = []
    for c in clusters:
        if c is not background and c.border <= 0.2 and c.area < 0.5:
            pieces = components(c.members)
            n = int(pieces.max())
            candidates += [c] if n <= 1 else [_cluster(features, pieces == i) for i in range(1, n + 1)
                                              if float((pieces == i).float().mean()) >= 0.02]
    candidates = [c for c in candidates if c.edge <= 0.3]
    things = [c for c in candidates if c.self_ratio >= min_self]
    if count is not None and len(things) < count:   # asked for more: take the best of the rest too
        rest = sorted((c for c in candidates if all(c is not t for t in things)), key=lambda c: -c.self_ratio)
        things += rest[:count - len(things)]
    while pair := next(((i, j) for i, j in combinations(range(len(things)), 2)
                        if _same_thing(things[i], things[j], share)), None):
        things[pair[0]] = _cluster(features, things[pair[0]].members | things.pop(pair[1]).members)
    things.sort(key=lambda c: {"self": c.self_ratio, "eot": c.eot, "both": c.self_ratio * c.eot}[saliency],
                reverse=True)
    return things[:count] if count is not None else things


def joint_bilateral(maps: torch.Tensor, guide: torch.Tensor, *, radius: int = 5, sigma_space: float = 3.0,
                    sigma_colour: float = 0.1, iterations: int = 2) -> torch.Tensor:
    """Joint bilateral filter of (k, H, W) maps by a (3, H, W) guide in 0..1: the maps' edges move to its."""
    k, hh, ww = maps.shape
    size = 2 * radius + 1
    ys, xs = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
    spatial = torch.exp(-(xs ** 2 + ys ** 2).float() / (2 * sigma_space ** 2)).flatten()  # (S,)

    def patches(x):   # (C, S, HW): every pixel's neighbours, the edges replicated
        return F.unfold(F.pad(x[None], (radius,) * 4, mode="replicate"), size).reshape(len(x), size * size, -1)

    colour = torch.exp(-((patches(guide) - guide.reshape(3, 1, -1)) ** 2).sum(0) / (2 * sigma_colour ** 2))
    weights = spatial[:, None] * colour
    weights = weights / weights.sum(0, keepdim=True)
    out = maps
    for _ in range(iterations):
        out = (patches(out) * weights[None]).sum(1).reshape(k, hh, ww)
    return out


def fill_holes(mask: torch.Tensor) -> torch.Tensor:
    """The mask and the parts of its complement that do not reach the border."""
    parts = components(~mask)
    return ~torch.isin(parts, parts[border_cells(*mask.shape) & ~mask])


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    if not mask.any():
        return mask
    parts = components(mask)
    return parts == torch.bincount(parts[mask]).argmax()


def concept_masks(things: list[Cluster], size: int, *, share: float = 0.8,
                  guide: torch.Tensor | None = None) -> torch.Tensor:
    """(k, size, size) soft maps: thing i holds the pixels >= 0.5, one thing a pixel (snapped to `guide`'s edges)."""
    if not things:
        return torch.zeros((0, size, size))
    h, w = things[0].members.shape
    work = (min(size, WORK_CELL * h), min(size, WORK_CELL * w))
    maps = torch.stack([(c.key_map() * (0.5 / share)).clamp(max=1.0) for c in things])
    maps = _resize(maps, work)
    if guide is not None:
        if tuple(guide.shape[-2:]) != work:
            guide = _resize(guide.float(), work, "area")
        maps = joint_bilateral(maps, guide)
    win = maps.argmax(0)
    kept = torch.stack([fill_holes(largest_component((m >= 0.5) & (win == i))) for i, m in enumerate(maps)])
    out = torch.where(kept, torch.ones(()), maps.clamp(max=0.49))
    if work != (size, size):
        out = _resize(out, (size, size))
    return out


def left_to_right(masks: list[np.ndarray]) -> list[int]:
    """Masks' order left to right by centroid; within 1/8 of the width, top first."""
    h, w = masks[0].shape
    cents = [(xs.mean() if len(xs) else w, ys.mean() if len(ys) else h) for ys, xs in map(np.nonzero, masks)]

    def cmp(i, j):
        (xi, yi), (xj, yj) = cents[i], cents[j]
        if abs(xi - xj) > w / 8:
            return -1 if xi < xj else 1
        return -1 if yi < yj else 1 if yi > yj else 0

    return sorted(range(len(masks)), key=cmp_to_key(cmp))


@dataclass
class Localization:
    masks: list[np.ndarray]                 # bool, at the given image's resolution, left to right
    clusters: torch.Tensor                  # (h, w) cluster labels
    things: list[Cluster]                   # in mask order
    features: AttentionFeatures


def localize(manager, image, *, count: int | None = None, timestep: int = DEFAULT_TIMESTEP,
             clusters: int = DEFAULT_CLUSTERS, seed=0, repeats: int = 2, prompt: str = "", saliency: str = "self",
             refine: bool = True) -> Localization:
    """`find_concepts` with what it saw (clusters, their scores, attention)."""
    if count is not None:
        count = whole("the number of concepts", count, 1, MAX_CONCEPTS)
    if saliency not in ("self", "eot", "both"):
        raise StudioError(f"saliency must be 'self', 'eot' or 'both' (got {saliency!r})")
    clusters = whole("clusters", clusters, 2, 16)
    original = open_image(image)
    width, height = original.size
    size = models.of(manager.pipe).default_size
    picture = prepare_image(original, size)[0]
    features = attention_features(manager, picture, timestep=timestep, seed=seed, repeats=repeats, prompt=prompt)
    labels, _ = kl_kmeans(features.affinity, max(clusters, (count or 0) + 2), seed=parse_seed(seed))
    things = select_concepts(features, labels, count=count, saliency=saliency)
    if not things:
        raise StudioError("no object found: every part of the image attends like background. Draw the masks, "
                          "click the objects (Segment Anything), or set the number of concepts to look for")
    guide = torch.from_numpy(picture).permute(2, 0, 1).float() / 255 if refine else None
    soft = concept_masks(things, size, guide=guide)
    if (width, height) != (size, size):   # back onto the upload's own pixels, 0 outside the crop
        left, top, right, bottom = crop_box(width, height)
        soft = F.pad(_resize(soft, (bottom - top, right - left)), (left, width - right, top, height - bottom))
    masks = [(s >= 0.5).numpy() for s in soft]
    keep = [i for i, m in enumerate(masks) if m.sum() >= max(4, 0.002 * m.size)]
    if not keep:
        raise StudioError("no object found: the regions found were too small. Draw the masks or click the objects")
    order = [keep[i] for i in left_to_right([masks[j] for j in keep])]
    return Localization([masks[i] for i in order], labels.reshape(features.grid), [things[i] for i in order], features)


def find_concepts(manager, image, **options) -> list[np.ndarray]:
    """Masks (bool, at `image`'s size, left to right) of the things in `image` (options: `localize`'s)."""
    return localize(manager, image, **options).masks
