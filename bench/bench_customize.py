"""Customization benchmark: training throughput and peak memory per method (vs a stock diffusers+peft
LoRA step in the same run), and, with --quality on the toy model, the oracle-measured bars of the
customization issue: teaching the held-out shapes, composing them by each method, unrelated prompts'
accuracy while the concepts are active, and the export -> import round trip.

    python bench/bench_customize.py                      # throughput, toy model
    python bench/bench_customize.py --quality --seeds 4  # + the bars (slow on CPU)
    python bench/bench_customize.py --arch sd15          # throughput, SD-1.5 architecture (GPU: fp16, 512²)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import bench_manager, peak_mb, sync, write_json  # noqa: E402
from studio.customize.images import load_images  # noqa: E402
from studio.customize.train import METHODS, train_concept  # noqa: E402
from studio.generation import GenerationRequest  # noqa: E402
from studio.toyworld.presets import toy_examples, toy_prior_prompts, toy_reg_prompts  # noqa: E402
from studio.toyworld.scenes import COLOURS  # noqa: E402


def images_for(manager, shape="heart"):
    pipe = manager.pipe
    res = pipe.unet.config.sample_size * pipe.vae_scale_factor
    ex = toy_examples(shape)
    return load_images([Image.fromarray(im).resize((res, res)) for im, _ in ex], res, [c for _, c in ex])[0]


def stock_lora_step_s(manager, batch: int, steps: int) -> float:
    """A plain diffusers + peft LoRA training step (no studio hooks): the reference for throughput."""
    from peft import LoraConfig

    pipe = manager.pipe
    unet, device = pipe.unet, pipe.unet.device
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
                     adapter_name="stock")
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-4)
    s = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, s, s, device=device)
    ids = pipe.tokenizer(["a photo of a dog"] * batch, padding="max_length", return_tensors="pt").input_ids.to(device)
    autocast = torch.autocast("cuda", dtype=unet.dtype) if device.type == "cuda" and unet.dtype != torch.float32 \
        else torch.autocast("cpu", enabled=False)
    times = []
    try:
        for _ in range(steps):
            sync(device)
            t = time.perf_counter()
            with autocast:
                cond = pipe.text_encoder(ids)[0]
                pred = unet(x.to(unet.dtype), torch.randint(0, 1000, (batch,), device=device), cond).sample
            loss = (pred.float() - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t)
    finally:
        unet.unload_lora()
        unet._hf_peft_config_loaded = False
    return float(np.median(times[2:] or times))


def throughput(manager, steps: int, batch: int) -> dict:
    device = manager.pipe.unet.device
    images = images_for(manager)
    out = {}
    for method in METHODS:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stamps = []
        train_concept(manager, images, "<bench>", method=method, steps=steps, batch=batch,
                      progress=lambda d, t: (sync(device), stamps.append(time.perf_counter())))
        per_step = float(np.median(np.diff(stamps)[2:] if len(stamps) > 4 else np.diff(stamps)))
        out[method] = {"steps_per_s": 1 / per_step, "peak_mb": peak_mb(device)}
    out["stock diffusers+peft LoRA (attention)"] = {"steps_per_s": 1 / stock_lora_step_s(manager, batch, steps),
                                                    "peak_mb": peak_mb(device)}
    return out


# -- the bars (toy model) -------------------------------------------------------------------------
def oracle_rates(manager, prompt: str, shape: str | None, colour: str | None, seeds: int) -> dict:
    from studio.toyworld.evaluate import bundled_oracle

    oracle = bundled_oracle()
    reads = [oracle.read(im) for im in manager.generate(GenerationRequest(prompt, seed=0, batch=seeds)).images]
    out = {}
    if shape:
        out["shape"] = float(np.mean([any(r.shape == shape for r in rs) for rs in reads]))
    if colour:
        out["colour"] = float(np.mean([any(r.colour == colour for r in rs) for rs in reads]))
    return out


def teach(manager, shape: str, token: str, seeds: int, **kw) -> tuple:
    t = time.perf_counter()
    edit = train_concept(manager, images_for(manager, shape), token, **kw)
    minutes = (time.perf_counter() - t) / 60
    manager.apply(edit)
    index = manager.stack.position
    rates = {"a <token>": oracle_rates(manager, f"a {token}", shape, None, seeds)}
    for c in COLOURS:
        rates[f"a {c} <token>"] = oracle_rates(manager, f"a {c} {token}", shape, c, seeds)
    coloured = [v for k, v in rates.items() if k != "a <token>"]
    summary = {"steps": edit.params["steps"], "train_minutes": round(minutes, 2),
               "a <token>: shape": rates["a <token>"]["shape"],
               "a <colour> <token>: shape": float(np.mean([v["shape"] for v in coloured])),
               "a <colour> <token>: colour": float(np.mean([v["colour"] for v in coloured])), "rates": rates}
    print(shape, json.dumps({k: v for k, v in summary.items() if k != "rates"}), flush=True)
    return index, summary


def both_rate(manager, prompt: str, seeds: int) -> dict:
    """How often both learned shapes (and each one) are in the image."""
    from studio.toyworld.evaluate import bundled_oracle

    oracle = bundled_oracle()
    images = [im for start in range(0, seeds, 16)
              for im in manager.generate(GenerationRequest(prompt, seed=start, batch=min(16, seeds - start))).images]
    shapes = [{r.shape for r in oracle.read(im)} for im in images]
    return {"both": float(np.mean([{"heart", "cross"} <= s for s in shapes])),
            "heart": float(np.mean(["heart" in s for s in shapes])),
            "cross": float(np.mean(["cross" in s for s in shapes]))}


def quality(manager, seeds: int, settings: dict) -> dict:
    """The bars, with both concepts trained by train_concept(**settings)."""
    from studio.customize import compose
    from studio.customize.library import compose as compose_applied, set_strength
    from studio.toyworld.evaluate import score, single_prompts

    kw = dict(settings, prior_prompts=toy_prior_prompts())
    scope = settings["scope"]
    out = {"settings": settings}
    before = score(manager, single_prompts(), seeds=max(1, seeds // 2))["single"].rates()
    heart, out["heart"] = teach(manager, "heart", "<heart>", seeds, **kw)
    cross, out["cross"] = teach(manager, "cross", "<cross>", seeds, **kw)
    during = score(manager, single_prompts(), seeds=max(1, seeds // 2))["single"].rates()
    out["unrelated prompts (single objects)"] = {"before": before, f"with both concepts (scope {scope})": during}
    other = "always" if scope == "prompt" else "prompt"
    for s in (other, scope):  # the same concepts acting on the other scope, then back
        for i in (heart, cross):
            set_strength(manager, i, scope=s)
        if s == other:
            out["unrelated prompts (single objects)"][f"with both concepts (scope {other})"] = score(
                manager, single_prompts(), seeds=max(1, seeds // 2))["single"].rates()
    print("unrelated", json.dumps(out["unrelated prompts (single objects)"]), flush=True)

    prompt = "a <heart> and a <cross>"
    halves = [("a <heart>", (0.0, 0.0, 0.5, 1.0)), ("a <cross>", (0.5, 0.0, 1.0, 1.0))]
    comp = {"both concepts applied (summed)": both_rate(manager, prompt, seeds)}
    manager.apply(compose.region_edit(halves))
    comp["region-aware sampling"] = both_rate(manager, prompt, seeds)
    manager.undo()
    manager.apply(compose.region_edit(halves, collage=0.2))
    comp["regions by collage (redraw 0.2)"] = both_rate(manager, prompt, seeds)
    manager.undo()
    manager.apply(compose.t2i_zero_edit(["<heart>", "<cross>"]))
    comp["T2I-Zero correction"] = both_rate(manager, prompt, seeds)
    manager.undo()
    idx = [heart, cross]
    for how in ("merge", "adapters"):
        here = manager.stack.position
        compose_applied(manager, idx, how, reg_prompts=toy_reg_prompts())
        comp[f"closed-form {how}" if how == "merge" else "weighted adapters (1, 1)"] = both_rate(manager, prompt, seeds)
        manager.apply(compose.region_edit(halves))
        comp[f"{how} + regions"] = both_rate(manager, prompt, seeds)
        manager.undo()
        manager.undo()
        for i in idx:
            manager.toggle(i)
        assert manager.stack.position == here
    out["composition: both shapes in 'a <heart> and a <cross>'"] = comp
    print("composition", json.dumps(comp), flush=True)

    from studio.customize.formats import export_concept, import_concept

    edit = manager.stack.entries[idx[0] - 1].edit
    manager.reset()
    manager.apply(edit)
    a = np.asarray(manager.generate(GenerationRequest("a red <heart>", seed=3)).images[0])
    manager.undo()
    folder = Path(tempfile.mkdtemp())
    written = export_concept(edit, folder, model=manager)["written"]
    round_trip = {}
    for fmt, files in {"A1111 embedding + kohya LoRA": written["embedding"] + written["lora"]}.items():
        manager.apply(import_concept(files, token="<heart>", pipe=manager))
        b = np.asarray(manager.generate(GenerationRequest("a red <heart>", seed=3)).images[0])
        round_trip[fmt] = bool(np.array_equal(a, b))
        manager.undo()
    out["export -> import identical image"] = round_trip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["toy", "sd15"], default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20, help="steps per method for throughput")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--quality", action="store_true", help="toy only: the oracle-measured bars (slow on CPU)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--method", default="lora")
    ap.add_argument("--targets", default="attention+ff")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="training seed (the LoRA's random start, batches, noise)")
    ap.add_argument("--prior-weight", type=float, default=0.0, help="prior preservation on the known toy shapes")
    ap.add_argument("--cut-mix", type=float, default=0.5, help="share of Cut-Mix composites with prior images")
    ap.add_argument("--prior-images", type=int, default=48)
    ap.add_argument("--scope", default="prompt", help="where the concepts act: prompt (their token) or always")
    ap.add_argument("--out", default="bench/results/customize.json")
    args = ap.parse_args()
    manager = bench_manager(args.arch, args.device)
    results = {"model": manager.describe(), "device": str(manager.pipe.device), "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "batch": args.batch, "throughput": throughput(manager, args.steps, args.batch)}
    print(f"{'method':<42}{'steps/s':>10}{'peak MB':>12}")
    for k, v in results["throughput"].items():
        print(f"{k:<42}{v['steps_per_s']:>10.2f}{v['peak_mb']:>12.0f}")
    if args.quality:
        results["quality"] = quality(manager, args.seeds, dict(
            method=args.method, steps=args.train_steps, lora_targets=args.targets, rank=args.rank, seed=args.seed,
            prior_weight=args.prior_weight, prior_images=args.prior_images, scope=args.scope, cut_mix=args.cut_mix))
    write_json(args.out, results)


if __name__ == "__main__":
    main()
