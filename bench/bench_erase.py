"""Erasure benchmark: closed-form speed, undo, memory over cycles; on the toy world, the quality bars.

    python bench/bench_erase.py [--arch toy|sd15] [--device auto] [--quality] [--out bench/results/erase.json]

Speed: one concept erased with 100 preserve prompts, end to end (text encoding included), against
the reference way (UCE's published loop: per layer, per prompt outer products, then an inverse)
on the same inputs in the same run. Quality (toy only): oracle-measured presence for the bars of
the erasure issue, RECE/RealEra vs the plain edit, and the specificity curve of stacked erasures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import bench_manager, peak_mb, sync, write_json  # noqa: E402
from studio.edits import find_tensor  # noqa: E402
from studio.erase.closed_form import check_params, edited_layers, erase_edit, erase_sets  # noqa: E402
from studio.toyworld.presets import erasure_report  # noqa: E402
from studio.toyworld.scenes import COLOURS, POSITION_PHRASES, SHAPES, STYLES  # noqa: E402

PRESERVE = [f"{st} {c} {s} {pos}" for st in STYLES for c in COLOURS for s in SHAPES for pos in POSITION_PHRASES][:100]


def reference_uce(pipe, params) -> list[torch.Tensor]:
    """UCE as its authors wrote it: for each layer, accumulate outer products prompt by prompt, invert."""
    p = check_params(params)
    E, G, P = erase_sets(pipe, p)
    out = []
    with torch.no_grad():
        for name in edited_layers(pipe):
            w = find_tensor(pipe, name).float()
            mat1 = p["lam"] * w
            mat2 = p["lam"] * torch.eye(w.shape[1], device=w.device)
            for e, g in zip(E, G):
                mat1 += p["erase_scale"] * torch.outer(w @ g, e)
                mat2 += p["erase_scale"] * torch.outer(e, e)
            for q in P:
                mat1 += p["preserve_scale"] * torch.outer(w @ q, q)
                mat2 += p["preserve_scale"] * torch.outer(q, q)
            out.append(mat1 @ torch.inverse(mat2))
    return out


def timed(fn, device, repeat=5) -> float:
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def speed(manager, concept: str) -> dict:
    device = manager.pipe.device
    params = erase_edit(concept, preserve=PRESERVE).params
    studio_s = timed(lambda: (manager.apply(erase_edit(concept, preserve=PRESERVE)), manager.undo()), device)
    manager.apply(erase_edit(concept, preserve=PRESERVE))
    undo_s = timed(lambda: (manager.undo(), manager.redo()), device, repeat=20) / 2
    manager.undo()
    reference_s = timed(lambda: reference_uce(manager.pipe, params), device, repeat=3)
    memory = []
    for _ in range(50):
        manager.apply(erase_edit(concept, preserve=PRESERVE))
        manager.undo()
        memory.append(torch.cuda.memory_allocated() / 2**20 if device.type == "cuda" else peak_mb(device))
    return {"erase_s (studio, incl. undo)": studio_s, "reference_uce_s": reference_s, "undo_ms": undo_s * 1000,
            "memory_first_mb": memory[0], "memory_last_mb": memory[-1], "memory_kind": "cuda allocated" if
            device.type == "cuda" else "max RSS", "preserve_prompts": len(PRESERVE)}


def summary(report) -> dict:
    return {s["group"]: {"before": s["before"], "after": s["after"], "prompts": s["prompts"]} for s in report.summary()}


def quality(manager, seeds: int) -> dict:
    others = [c for c in COLOURS if c != "red"]
    out = {}
    for name, kw in [("red: UCE", {}), ("red: UCE+RECE(1)", dict(rece_rounds=1)),
                     ("red: UCE+RealEra(8)", dict(neighbours=8))]:
        manager.apply(erase_edit("red", preserve=others, templates="toy", **kw))
        out[name] = summary(erasure_report(manager, ["red"], others, seeds=seeds))
        manager.undo()
        print(name, json.dumps(out[name]), flush=True)
    manager.apply(erase_edit("striped", templates="toy", preserve=["dotted", "outlined", "solid"]))
    out["striped: UCE"] = summary(erasure_report(manager, ["striped"], ["dotted", "outlined"], seeds=seeds))
    manager.undo()
    print("striped", json.dumps(out["striped: UCE"]), flush=True)
    out.update(stacked(manager, seeds))
    return out


def stacked(manager, seeds: int) -> dict:
    """Specificity on concepts never erased after 1, 3 and 10 stacked erasures, each with the tab's
    default preserve list (the other toy concepts of its kind not yet erased) and without one."""
    from studio.toyworld.concepts import neighbours
    from studio.toyworld.evaluate import presence_rate

    order = ["red", "striped", "circle", "green", "dotted", "square", "yellow", "outlined", "triangle", "purple"]
    kept = {"blue": ["a blue star", "a blue square"], "orange": ["an orange circle", "an orange triangle"]}

    def presence():
        return sum(presence_rate(manager, p, c, seeds=seeds) for c, p in kept.items()) / len(kept)

    out = {}
    for mode in ("preserve list", "no preserve list"):
        curve = {0: presence()}
        for i, concept in enumerate(order, 1):
            keep = [n for n in neighbours(concept) if n not in order[:i]] if mode == "preserve list" else []
            manager.apply(erase_edit(concept, templates="toy", preserve=keep))
            if i in (1, 3, 10):
                curve[i] = presence()
                print("stacked", mode, i, curve[i], flush=True)
        manager.reset()
        out[f"stacked erasures ({mode}): blue/orange presence"] = curve
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["toy", "sd15"], default="toy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quality", action="store_true", help="toy only: the oracle-measured bars (slow on CPU)")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--stacked", action="store_true", help="toy only: just the stacked-erasure specificity curve")
    ap.add_argument("--out", default="bench/results/erase.json")
    args = ap.parse_args()
    manager = bench_manager(args.arch, args.device)
    results = {"model": manager.describe(), "device": str(manager.pipe.device), "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "speed": speed(manager, "red")}
    print(f"{'model':<34}{'studio erase':>14}{'reference UCE':>15}{'undo':>10}{'memory first→last':>22}")
    s = results["speed"]
    print(f"{results['model'][:33]:<34}{s['erase_s (studio, incl. undo)']:>13.3f}s{s['reference_uce_s']:>14.3f}s"
          f"{s['undo_ms']:>8.2f}ms{s['memory_first_mb']:>12.1f}→{s['memory_last_mb']:.1f} MB ({s['memory_kind']})")
    if args.stacked:
        results["quality"] = stacked(manager, args.seeds)
    elif args.quality:
        results["quality"] = quality(manager, args.seeds)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
