"""Memory over a long session: generate/edit/undo cycles, and switching models.

    python bench/bench_memory.py [--model builtin] [--device auto] [--cycles 100] [--steps 4]

One cycle is what a user does in the studio: generate an image, apply an edit (a layer scale, or
every 10th cycle a closed-form erasure), generate again, undo; the history is saved after every
change, as the app does. Process RSS (and CUDA allocated/reserved memory on a GPU) is sampled
after a gc every 10 cycles. The same number of plain diffusers calls on the same pipeline is
measured first, as the stock baseline. Then the model is switched back and forth: the old
pipeline must be freed (weakref dead) and RSS must come back. Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import weakref
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from studio.erase.closed_form import erase_edit  # noqa: E402
from studio.generation import GenerationRequest  # noqa: E402
from studio.layer_scale import scale_edit  # noqa: E402
from studio.loading import TOY_MODEL  # noqa: E402
from studio.manager import PipelineManager  # noqa: E402
from studio.toyworld import presets  # noqa: E402,F401  (the "toy" template preset)

MiB = 2**20


def sample(device) -> dict:
    gc.collect()
    out = {"rss_mib": psutil.Process().memory_info().rss / MiB}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out.update(cuda_allocated_mib=torch.cuda.memory_allocated() / MiB,
                   cuda_reserved_mib=torch.cuda.memory_reserved() / MiB)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--switches", type=int, default=8)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    history = tempfile.TemporaryDirectory()
    m = PipelineManager(args.model, device=args.device, history_dir=history.name)
    pipe = m.pipe
    pipe.set_progress_bar_config(disable=True)
    device = pipe.device
    request = GenerationRequest("a red circle", "", "0", args.steps, 7.5, None, None, 1, "DPM++ 2M")

    stock = []  # the same pipeline called directly, as plain diffusers code would
    for i in range(args.cycles + 1):
        if i % 10 == 0:
            stock.append({"cycle": i, **sample(device)})
        if i < args.cycles:
            pipe("a red circle", num_inference_steps=args.steps, generator=torch.Generator().manual_seed(i))

    studio = []
    for i in range(args.cycles + 1):
        if i % 10 == 0:
            studio.append({"cycle": i, **sample(device)})
        if i < args.cycles:
            m.generate(request)
            m.apply(erase_edit(["red"], preserve=["green", "blue"], templates="toy") if i % 10 == 9
                    else scale_edit(r"attn2\.to_v\.weight", 0.9))
            m.generate(request)
            m.undo()

    del pipe  # the manager must hold the only reference, as in the app
    switches = []
    sources = [str(TOY_MODEL) if args.model == "builtin" else "builtin", args.model]
    for i in range(args.switches):
        for source in sources:
            old = weakref.ref(m.pipe)
            m.load(source)
            m.pipe.set_progress_bar_config(disable=True)
            m.generate(request)
            gc.collect()
            freed = old() is None
            switches.append({"to": Path(source).name, "old_pipeline_freed": freed, **sample(device)})

    def growth(rows, key="rss_mib"):
        return rows[-1][key] - rows[1][key]  # from cycle 10 (after warm-up) to the end

    print(f"device {device}, {args.cycles} cycles of {args.steps}-step generations, model {args.model}\n")
    print(f"{'cycle':>6} {'stock diffusers RSS':>20} {'studio RSS':>12}" +
          (f" {'studio CUDA alloc':>18}" if device.type == "cuda" else ""))
    for a, b in zip(stock, studio):
        print(f"{a['cycle']:>6} {a['rss_mib']:>17.1f} MiB {b['rss_mib']:>8.1f} MiB" +
              (f" {b['cuda_allocated_mib']:>14.1f} MiB" if device.type == "cuda" else ""))
    print(f"\nRSS growth after warm-up (cycle 10 -> {args.cycles}): stock {growth(stock):+.1f} MiB, "
          f"studio {growth(studio):+.1f} MiB")
    print("\nmodel switches:")
    for s in switches:
        print(f"  -> {s['to']:<12} old pipeline freed: {s['old_pipeline_freed']}  RSS {s['rss_mib']:.1f} MiB")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory-{device.type}.json"
    path.write_text(json.dumps(dict(model=args.model, device=str(device), machine=platform.platform(),
                                    cycles=args.cycles, steps=args.steps, stock=stock, studio=studio,
                                    growth_mib=dict(stock=growth(stock), studio=growth(studio)),
                                    switches=switches), indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
