"""Long sessions do not leak: cycles of generate/edit/undo keep the live tensors and RSS flat, and
switching models frees the old pipeline (the memory figures themselves: bench/bench_memory.py)."""
import gc
import weakref

import psutil
import torch

from studio.generation import GenerationRequest
from studio.layer_scale import scale_edit
from studio.loading import TOY_MODEL
from studio.manager import PipelineManager


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_generate_edit_undo_cycles_leave_memory_flat(tmp_path):
    m = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    m.pipe.set_progress_bar_config(disable=True)
    request = GenerationRequest("a red circle", "", "0", 2, 7.5, None, None, 1, "DPM++ 2M")

    def cycles(n):
        for _ in range(n):
            m.generate(request)
            m.apply(scale_edit(r"attn2\.to_v\.weight", 0.9))
            m.generate(request)
            m.undo()

    cycles(5)  # warm-up: allocator pools, lazily built modules
    tensors, rss = live_tensors(), psutil.Process().memory_info().rss
    cycles(40)
    assert live_tensors() == tensors  # nothing the cycles made is still referenced
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20
    assert len(m.history()) == 1  # each apply after an undo replaces the redo tail


def test_switching_models_frees_the_old_pipeline_and_its_history(tmp_path):
    m = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    m.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    old_pipe, old_stack = weakref.ref(m.pipe), weakref.ref(m.stack)
    m.load(str(TOY_MODEL))
    gc.collect()
    assert old_pipe() is None and old_stack() is None
    assert m.history() == []
