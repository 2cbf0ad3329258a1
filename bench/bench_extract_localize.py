"""Benchmark automatic concept localization (Extract tab, 'Find concepts') on the toy world.

    python bench/bench_extract_localize.py [--scenes 32] [--start 5000] [--single 24] [--device auto]
                                           [--out bench/results]

For generator scenes with two objects (make_scene(seed, n_objects=2, held_out=True), seeds
start..start+scenes-1: not the seeds the method was tuned on, 0..31 and 1000..1031), the masks
found from the bundled model's self-attention (studio.extract.localize.find_concepts) are matched to
the generator's exact object masks (the best one-to-one matching; an object left without a mask
scores 0) and their IoU averaged. Target: mean IoU >= 0.6 with the default settings.

Rows: automatic count (default), automatic count without the image-guided refinement (attention
alone), the count given (2), and one-object scenes. Columns: mean / median / min IoU over scenes,
the share of objects matched with IoU >= 0.5, the share of scenes where exactly the right number of
masks was found, seconds per image. Also printed: how the end-of-text token's map (ConceptExpress'
saliency cue) covers the objects against the image mean, and the mean IoU per fill style.
Prints a table and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.errors import StudioError  # noqa: E402
from studio.extract.localize import attention_features, localize  # noqa: E402
from studio.manager import PipelineManager  # noqa: E402
from studio.toyworld.scenes import make_scene  # noqa: E402

TARGET = 0.6


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def matched_ious(found: list[np.ndarray], truth: list[np.ndarray]) -> list[float]:
    """Per true object, its IoU under the best one-to-one matching of found masks to objects."""
    best, best_sum = [0.0] * len(truth), -1.0
    slots = list(range(len(found))) + [None] * len(truth)
    for perm in set(itertools.permutations(slots, len(truth))):
        scores = [iou(found[p], t) if p is not None else 0.0 for p, t in zip(perm, truth)]
        if sum(scores) > best_sum:
            best, best_sum = scores, sum(scores)
    return best


def run(manager, scenes, **options) -> dict:
    per_scene, per_object, exact, seconds, styles = [], [], 0, [], {}
    for scene in scenes:
        start = time.perf_counter()
        try:
            masks = localize(manager, scene.image, **options).masks
        except StudioError:
            masks = []
        seconds.append(time.perf_counter() - start)
        truth = [o.mask for o in scene.objects]
        scores = matched_ious(masks, truth)
        per_scene.append(sum(scores) / len(scores))
        per_object += scores
        exact += len(masks) == len(truth)
        for o, s in zip(scene.objects, scores):
            styles.setdefault(o.style, []).append(s)
    return {"options": {k: v for k, v in options.items()}, "scenes": len(scenes),
            "mean_iou": statistics.mean(per_scene), "median_iou": statistics.median(per_scene),
            "min_iou": min(per_scene), "objects_iou_ge_0.5": sum(s >= 0.5 for s in per_object) / len(per_object),
            "exact_count": exact / len(scenes), "seconds_per_image": statistics.mean(seconds),
            "per_style": {k: statistics.mean(v) for k, v in sorted(styles.items())}, "per_scene": per_scene}


def eot_contrast(manager, scenes) -> float:
    """Mean end-of-text attention (empty prompt) over the objects / its mean over the image."""
    ratios = []
    for scene in scenes:
        f = attention_features(manager, scene.image)
        eot = torch.nn.functional.interpolate(f.eot[None, None], size=scene.image.shape[:2], mode="bilinear",
                                              align_corners=False)[0, 0].numpy()
        union = np.any([o.mask for o in scene.objects], axis=0)
        ratios.append(float(eot[union].mean() / eot.mean()))
    return statistics.mean(ratios)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenes", type=int, default=32, help="two-object scenes (at least 16 for the bar)")
    p.add_argument("--start", type=int, default=5000, help="first scene seed")
    p.add_argument("--single", type=int, default=24, help="one-object scenes too (0: none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    manager = PipelineManager("builtin", device=args.device)
    manager.pipe.set_progress_bar_config(disable=True)
    two = [make_scene(s, n_objects=2, held_out=True) for s in range(args.start, args.start + args.scenes)]
    one = [make_scene(s, n_objects=1, held_out=True) for s in range(args.start + 500, args.start + 500 + args.single)]
    rows = {
        "two objects, automatic count (default)": (two, {}),
        "two objects, automatic, attention only (no refine)": (two, {"refine": False}),
        "two objects, count=2": (two, {"count": 2}),
        "two objects, count=2, attention only": (two, {"count": 2, "refine": False}),
    }
    if args.single:
        rows["one object, automatic count"] = (one, {})
        rows["one object, automatic, attention only"] = (one, {"refine": False})
    results = {name: run(manager, scenes, **options) for name, (scenes, options) in rows.items()}
    contrast = eot_contrast(manager, two[:16])

    head = (f"{'setting':52s} {'scenes':>6s} {'mean':>6s} {'median':>6s} {'min':>6s} {'obj>=.5':>7s} "
            f"{'exact n':>7s} {'s/img':>6s}")
    print(f"Automatic localization on the toy world (seeds {args.start}..): IoU vs the generator's masks")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:52s} {r['scenes']:6d} {r['mean_iou']:6.3f} {r['median_iou']:6.3f} {r['min_iou']:6.3f} "
              f"{r['objects_iou_ge_0.5']:7.2f} {r['exact_count']:7.2f} {r['seconds_per_image']:6.2f}")
    default = results["two objects, automatic count (default)"]
    print("\nper fill style (default): " + ", ".join(f"{k} {v:.2f}" for k, v in default["per_style"].items()))
    print(f"end-of-text map over the objects / over the image (empty prompt, 16 scenes): {contrast:.2f}")
    verdict = "PASS" if default["mean_iou"] >= TARGET else "FAIL"
    print(f"bar: mean IoU >= {TARGET} on two-object scenes (default settings): {default['mean_iou']:.3f} {verdict}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = manager.pipe.device
    path = out / f"extract-localize-{device.type}.json"
    path.write_text(json.dumps({
        "device": str(device), "torch": torch.__version__, "platform": platform.platform(),
        "threads": torch.get_num_threads(), "model": manager.describe(), "seeds_two": [args.start, args.scenes],
        "seeds_one": [args.start + 500, args.single], "target": TARGET, "pass": verdict == "PASS",
        "eot_object_contrast": contrast, "results": results}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
