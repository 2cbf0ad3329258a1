"""What every benchmark script shares: the model to measure, honest timing on GPU, peak memory,
and writing the results as JSON."""
from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from studio.demo_model import build_demo_pipeline  # noqa: E402
from studio.loading import resolve_device, resolve_dtype  # noqa: E402
from studio.manager import PipelineManager  # noqa: E402


def sync(device) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_mb(device) -> float:
    """Peak CUDA allocation, or on CPU the process's peak resident memory, in MiB."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_manager(arch: str, device="auto") -> PipelineManager:
    """A random-weight pipeline of a real architecture (sd15: the real cost), fp16 on CUDA."""
    device = resolve_device(device)
    pipe = build_demo_pipeline(arch=arch).to(device=device, dtype=resolve_dtype("auto", device))
    pipe.set_progress_bar_config(disable=True)
    return PipelineManager.from_pipeline(pipe, f"random {arch}")


def bench_manager(arch: str, device="auto") -> PipelineManager:
    """The bundled toy model ("toy") or a random-weight pipeline of `arch`."""
    return PipelineManager("builtin", device=device) if arch == "toy" else random_manager(arch, device)


def write_json(path, results: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print("wrote", path)
