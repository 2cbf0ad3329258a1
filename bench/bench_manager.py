"""Benchmark the pipeline manager against a stock diffusers call, and the edit stack's costs.

    python bench/bench_manager.py [--arch tiny|sd15] [--device auto] [--steps 20] [--repeats 5]

Reports, in one run on one machine: generation time through PipelineManager vs calling the same
diffusers pipeline directly (same prompt, settings and noise), undo/redo time for an edit of all
cross-attention K/V weights, host memory held per edit, and memory after 50 apply/undo cycles
vs before (GPU memory on CUDA, process RSS on CPU). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import random_manager, sync  # noqa: E402
from studio.generation import GenerationRequest  # noqa: E402
from studio.layer_scale import scale_edit  # noqa: E402
from studio.loading import resolve_device, resolve_dtype  # noqa: E402
from studio.manager import PipelineManager  # noqa: E402

KV = r"attn2\.to_[kv]\.weight"


def timed(fn, device, repeats):
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory(device) -> int:
    if device.type == "cuda":
        sync(device)
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default=None, help="tiny (default on CPU) or sd15 (default on CUDA), random weights")
    ap.add_argument("--model", default=None, help="benchmark a real model instead (e.g. builtin: the toy model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--cycles", type=int, default=50)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    if args.model:
        manager, arch = PipelineManager(args.model, str(device)), args.model
        pipe = manager.pipe
    else:
        arch = args.arch or ("sd15" if device.type == "cuda" else "tiny")
        manager = random_manager(arch, device)
        pipe = manager.pipe
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    req = GenerationRequest("a photo of a red circle on the left", seed=0, steps=args.steps, width=size, height=size)
    latents, _ = req.validated(pipe).noise(pipe)

    def stock():
        pipe(prompt=req.prompt, num_inference_steps=args.steps, guidance_scale=req.guidance, height=size, width=size,
             latents=latents.to(device, dtype), generator=torch.Generator("cpu").manual_seed(0))

    stock()  # warm-up (kernels, allocator)
    manager.generate(req)
    # DPM++ 2M is the manager's default sampler and the demo pipeline's own scheduler: same work.
    t_stock, t_manager = timed(stock, device, args.repeats), timed(lambda: manager.generate(req), device, args.repeats)

    entry = manager.apply(scale_edit(KV, 0.5))
    n_tensors, backup = len(entry.patch.originals), entry.patch.backup_bytes
    t_undo = timed(lambda: (manager.undo(), manager.redo()), device, args.repeats)
    manager.undo()  # the next apply drops it from the history

    mem_before = memory(device)
    t = time.perf_counter()
    for i in range(args.cycles):
        manager.apply(scale_edit(KV, 0.5 + i / 1000))
        manager.undo()
    t_cycle = (time.perf_counter() - t) / args.cycles
    mem_after = memory(device)

    rows = [
        ("generation, stock diffusers (s)", t_stock),
        ("generation, PipelineManager (s)", t_manager),
        ("ratio manager / stock", t_manager / t_stock),
        (f"undo+redo of a K/V edit ({n_tensors} tensors) (ms)", t_undo * 1e3),
        ("apply+undo cycle (ms)", t_cycle * 1e3),
        ("host memory held per edit (MiB)", backup / 2**20),
        (f"{'GPU' if device.type == 'cuda' else 'RSS'} memory before {args.cycles} cycles (MiB)", mem_before / 2**20),
        (f"{'GPU' if device.type == 'cuda' else 'RSS'} memory after {args.cycles} cycles (MiB)", mem_after / 2**20),
    ]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    print(f"\nPipelineManager benchmark · {arch} · {device} · {str(dtype)[6:]} · {machine} · {size}px, {args.steps} steps")
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:10.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"manager-{Path(arch).name}-{device.type}.json"
    path.write_text(json.dumps(dict(arch=arch, device=str(device), dtype=str(dtype), machine=machine, size=size,
                                    steps=args.steps, results={n: v for n, v in rows}), indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
