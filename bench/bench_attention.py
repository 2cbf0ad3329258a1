"""Benchmark the Attention tab's engine: capture overhead, per-step store memory, map quality, guidance.

    python bench/bench_attention.py [--arch tiny|sd15] [--device auto] [--what speed,memory,miou,control]
                                    [--steps 20] [--repeats 5] [--scenes 40] [--seeds 8] [--out bench/results]

speed   generation through PipelineManager with and without capture (the ratio measured in the same
        run, interleaved; target <= 1.10): running sums only, + per-step store, + self-attention Q/K.
        --arch tiny|sd15 builds a random-weight pipeline of that architecture (SD-1.5 is the real cost).
memory  bytes of the per-step store (head-averaged maps of every cross-attention layer) for 50 steps,
        for --arch (measured on 2 steps, x25: every step stores the same shapes).
miou    the toy world (bundled model): binarized (tau=0.4) shape-word maps vs object masks,
        (a) maps-for-any-image mode on generator scenes vs the generator's exact masks,
        (b) generated scenes vs the oracle's segmentation. Target >= 0.5.
control the toy world: two-object prompts on fixed seeds; how often the oracle finds both objects
        without guidance, with Attend-and-Excite and with A-STAR (same seeds).
Prints a table per part and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.attention.any_image import image_maps  # noqa: E402
from studio.attention.control import Control, default_scale_factor  # noqa: E402
from studio.attention.maps import Selection, binarize, iou, normalize, word_maps  # noqa: E402
from studio.attention.run import CaptureOptions, generate_with_maps  # noqa: E402
from studio.capture import capture  # noqa: E402
from common import random_manager, sync  # noqa: E402
from studio.generation import GenerationRequest  # noqa: E402
from studio.loading import resolve_device  # noqa: E402
from studio.manager import PipelineManager  # noqa: E402
from studio.tokenizer import sequence_length  # noqa: E402

PROMPT = "a photo of a red circle on the left and a blue square"
TAU = 0.4


def toy_manager(device) -> PipelineManager:
    m = PipelineManager("builtin", str(device))
    m.pipe.set_progress_bar_config(disable=True)
    return m


# -- speed ---------------------------------------------------------------------------------------
def bench_speed(manager, device, steps: int, repeats: int) -> dict:
    req = GenerationRequest(PROMPT, seed=0, steps=steps)
    variants = {
        "plain": lambda: manager.generate(req),
        "capture (running sums)": lambda: generate_with_maps(manager, req, CaptureOptions(per_step=False, self_step=-1)),
        "capture + per-step store": lambda: generate_with_maps(manager, req, CaptureOptions(per_step=True, self_step=-1)),
        "capture + per-step + self Q/K": lambda: generate_with_maps(manager, req, CaptureOptions(per_step=True)),
    }
    for fn in variants.values():  # warm-up
        fn()
    times = {k: [] for k in variants}
    for _ in range(repeats):  # interleaved, so drift hits every variant alike
        for k, fn in variants.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = {k: dict(seconds=med[k], ratio=med[k] / med["plain"]) for k in med}
    print(f"\nGeneration, {steps} steps, median of {repeats} (interleaved)")
    print(f"{'variant':<32}{'seconds':>10}{'vs plain':>10}")
    for k, r in rows.items():
        print(f"{k:<32}{r['seconds']:>10.3f}{r['ratio']:>10.3f}")
    return dict(steps=steps, repeats=repeats, rows=rows, target_ratio=1.10)


def bench_memory(manager, steps: int = 50) -> dict:
    measured = 2
    req = GenerationRequest(PROMPT, seed=0, steps=measured)
    with capture(manager, per_step=True, tokens=sequence_length(manager.pipe.tokenizer, PROMPT)) as session:
        manager.generate(req)
    per_step = session.cross.step_bytes() / measured
    layers = {n: tuple(v[0].shape) for n, v in session.cross.steps.items()}
    out = dict(steps=steps, tokens_kept=session.cross.tokens, dtype=str(session.cross.step_dtype),
               bytes_per_step=per_step, bytes_total=per_step * steps, layers=len(layers),
               sums_bytes=sum(t.numel() * t.element_size() for t in session.cross.sums.values()))
    print(f"\nPer-step store: {len(layers)} layers, {out['tokens_kept']} tokens kept, {out['dtype']}: "
          f"{per_step / 2**20:.3f} MiB/step, {out['bytes_total'] / 2**20:.2f} MiB for {steps} steps "
          f"(running sums: {out['sums_bytes'] / 2**20:.3f} MiB)")
    return out


# -- map quality -----------------------------------------------------------------------------------
# (layers, normalization before binarizing at tau): DAAM's is all layers, each word to its max
VARIANTS = {"all/max": (Selection(), "word"), "all/range": (Selection(), "range"),
            "8x8/max": (Selection(resolutions=(8,)), "word"), "16x16/max": (Selection(resolutions=(16,)), "word")}


def _binary(result, word, variant, image=0):
    sel, norm = VARIANTS[variant]
    _, maps = word_maps(result, [word], sel, size=(64, 64))
    return binarize(normalize(maps, norm), TAU)[image, 0]


def bench_miou(manager, scenes: int, seeds: int, steps: int, timesteps=(50, 100, 300)) -> dict:
    from studio.toyworld.evaluate import bundled_oracle, single_prompts, two_object_prompts
    from studio.toyworld.scenes import make_scene

    out = {"tau": TAU, "image_mode": {}, "generated": {}}
    picked = []
    for s in range(10 * scenes):
        sc = make_scene(s, synonyms=False)
        shapes = [o.shape for o in sc.objects]
        if len(set(shapes)) == len(shapes):
            picked.append(sc)
        if len(picked) == scenes:
            break
    for t in timesteps:
        acc = {k: [] for k in VARIANTS}
        for sc in picked:
            r = image_maps(manager, sc.image, sc.caption, timestep=t, repeats=4, self_attention=False)
            for k in VARIANTS:
                acc[k] += [iou(_binary(r, o.shape, k), torch.as_tensor(o.mask)) for o in sc.objects]
        out["image_mode"][t] = {k: float(np.mean(v)) for k, v in acc.items()} | {"objects": len(acc["all/max"])}
    oracle = bundled_oracle()
    specs = single_prompts()[::3] + two_object_prompts()
    acc = {k: [] for k in VARIANTS}
    found = total = 0
    for spec in specs:
        r = generate_with_maps(manager, GenerationRequest(spec.prompt, seed=0, steps=steps, batch=seeds),
                               CaptureOptions(per_step=False, self_step=-1))
        for i, image in enumerate(r.images):
            readings = oracle.read(image)
            for want in spec.objects:
                total += 1
                hit = [x for x in readings if x.shape == want.shape]
                if not hit:
                    continue
                found += 1
                for k in VARIANTS:
                    acc[k].append(iou(_binary(r, want.shape, k, i), torch.as_tensor(hit[0].mask)))
    out["generated"] = {k: float(np.mean(v)) for k, v in acc.items()} | {"objects": found, "asked": total,
                                                                         "prompts": len(specs), "seeds": seeds}
    print(f"\nToy-world mIoU of binarized (tau={TAU}) shape-word maps vs object masks (target >= 0.5)")
    print("columns: layers / normalization before the threshold (max: DAAM, tau of the word's max; "
          "range: tau of its min..max)")
    print(f"{'mode':<36}" + "".join(f"{k:>11}" for k in VARIANTS) + f"{'objects':>9}")
    for t, row in out["image_mode"].items():
        print(f"{'any-image, generator scenes, t=' + str(t):<36}" + "".join(f"{row[k]:>11.3f}" for k in VARIANTS)
              + f"{row['objects']:>9}")
    g = out["generated"]
    print(f"{'generated scenes, oracle masks':<36}" + "".join(f"{g[k]:>11.3f}" for k in VARIANTS) + f"{g['objects']:>9}")
    return out


# -- guidance -------------------------------------------------------------------------------------
def bench_control(manager, seeds: int, steps: int, methods: dict[str, Control]) -> dict:
    from studio.toyworld.evaluate import bundled_oracle, judge, two_object_prompts

    oracle = bundled_oracle()
    specs = two_object_prompts()
    verdicts = {k: [] for k in ["none", *methods]}
    seconds = {k: 0.0 for k in verdicts}
    for n, spec in enumerate(specs):
        subjects = [w.shape for w in spec.objects]
        for name in verdicts:
            c = None if name == "none" else methods[name]
            if c is not None:
                c.words = subjects
            t = time.perf_counter()
            r = generate_with_maps(manager, GenerationRequest(spec.prompt, seed=0, steps=steps, batch=seeds),
                                   CaptureOptions(per_step=False, self_step=-1), c)
            seconds[name] += time.perf_counter() - t
            verdicts[name] += [judge(oracle.read(im), spec.objects) for im in r.images]
        print(f"\r{n + 1}/{len(specs)} prompts", end="", flush=True)
    base_miss = [not v["shape"] for v in verdicts["none"]]
    rows = {}
    for name, vs in verdicts.items():
        rows[name] = dict(both_shapes=float(np.mean([v["shape"] for v in vs])),
                          both_objects_right=float(np.mean([v["both"] for v in vs])),
                          rescued=int(sum(v["shape"] for v, miss in zip(vs, base_miss) if miss)),
                          lost=int(sum(not v["shape"] for v, miss in zip(vs, base_miss) if not miss)),
                          seconds_per_image=seconds[name] / len(vs),
                          settings=None if name == "none" else methods[name].describe())
    print(f"\n\nTwo-object prompts: {len(specs)} prompts x {seeds} seeds; an object is missing without guidance "
          f"in {sum(base_miss)} images")
    print(f"{'method':<44}{'both shapes':>12}{'shape+colour':>14}{'rescued':>9}{'lost':>6}{'s/img':>8}")
    for name, r in rows.items():
        print(f"{name:<44}{r['both_shapes']:>12.1%}{r['both_objects_right']:>14.1%}{r['rescued']:>9}{r['lost']:>6}"
              f"{r['seconds_per_image']:>8.2f}")
    return dict(prompts=len(specs), seeds=seeds, steps=steps, missing_without=int(sum(base_miss)), rows=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="speed/memory: tiny (default on CPU) or sd15 (default on CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--what", default="speed,memory,miou,control")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--scenes", type=int, default=40, help="generator scenes for the any-image mIoU")
    ap.add_argument("--seeds", type=int, default=8, help="images per prompt (miou, control)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = resolve_device(args.device)
    arch = args.arch or ("sd15" if device.type == "cuda" else "tiny")
    parts = [p.strip() for p in args.what.split(",") if p.strip()]
    report = dict(device=str(device), torch=torch.__version__, platform=platform.platform(),
                  threads=torch.get_num_threads())
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    if {"speed", "memory"} & set(parts):
        manager = random_manager(arch, device)
        report["arch"] = arch
        if "speed" in parts:
            report["speed"] = bench_speed(manager, device, args.steps, args.repeats)
        if "memory" in parts:
            report["memory"] = bench_memory(manager)
    if {"miou", "control"} & set(parts):
        manager = toy_manager(device)
        report["model"] = manager.describe()
        if "miou" in parts:
            report["miou"] = bench_miou(manager, args.scenes, args.seeds, args.steps)
        if "control" in parts:
            latent = manager.pipe.unet.config.sample_size
            res = 16 if latent >= 32 else latent // 2
            small = default_scale_factor(latent)
            methods = {"attend-excite (published: 16x16, scale 20)": Control("attend-excite", resolution=16),
                       f"attend-excite ({res}x{res}, scale 20)": Control("attend-excite", resolution=res),
                       f"attend-excite ({res}x{res}, scale {small:g})": Control("attend-excite", resolution=res,
                                                                              scale_factor=small),
                       f"a-star ({res}x{res}, scale 20)": Control("a-star", resolution=res),
                       f"a-star ({res}x{res}, scale 10)": Control("a-star", resolution=res, scale_factor=10)}
            report["control"] = bench_control(manager, args.seeds, args.steps, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "attention-" + "-".join(parts) + (f"-{arch}" if {"speed", "memory"} & set(parts) else "") + f"-{device.type}.json"
    (out / name).write_text(json.dumps(report, indent=1, default=str))
    print("wrote", out / name)


if __name__ == "__main__":
    main()
