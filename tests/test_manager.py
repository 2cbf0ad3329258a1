"""PipelineManager on the built-in model: deterministic generation, the lock, stop, bad input."""
import threading

import numpy as np
import pytest

from studio.errors import JobStopped, StudioError
from studio.generation import GenerationRequest
from studio.layer_scale import scale_edit

FAST = dict(steps=4)


def pixels(result):
    return [np.asarray(im) for im in result.images]


def test_generation_is_deterministic_per_seed_and_batch_independent(manager):
    a = pixels(manager.generate(GenerationRequest("a red circle", seed=7, batch=2, **FAST)))
    b = pixels(manager.generate(GenerationRequest("a red circle", seed=8, **FAST)))
    c = pixels(manager.generate(GenerationRequest("a red circle", seed=7, batch=2, **FAST)))
    assert np.array_equal(a[0], c[0]) and np.array_equal(a[1], c[1])
    # image i of a batch is seed + i made alone (batched CPU matmuls may round 1 level differently)
    assert np.abs(a[1].astype(int) - b[0]).max() <= 2
    assert np.abs(a[0].astype(int) - a[1]).mean() > 10


def test_edit_changes_images_and_undo_restores_them_exactly(manager):
    req = GenerationRequest("a red circle", seed=3, **FAST)
    f0, before = manager.fingerprint(), pixels(manager.generate(req))
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.0))
    assert manager.fingerprint() != f0
    assert not np.array_equal(pixels(manager.generate(req))[0], before[0])
    manager.undo()
    assert manager.fingerprint() == f0
    assert np.array_equal(pixels(manager.generate(req))[0], before[0])


def test_compare_renders_before_and_after_and_returns_to_the_current_state(manager):
    req = GenerationRequest("a red circle", seed=-1, **FAST)
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    manager.apply(scale_edit(r"attn2\.to_k\.weight", 0.0))
    f = manager.fingerprint()
    before, after = manager.compare(req, index=2)
    assert before.seeds == after.seeds  # a random seed is drawn once for both sides
    assert not np.array_equal(pixels(before)[0], pixels(after)[0])
    assert manager.fingerprint() == f and manager.stack.position == 2
    fixed = GenerationRequest("a red circle", seed=after.seeds[0], **FAST)
    assert np.array_equal(pixels(manager.generate(fixed))[0], pixels(after)[0])


def test_generation_sees_one_consistent_model_while_another_thread_edits(manager):
    seen, started = [], threading.Event()

    def progress(step, total):
        seen.append(manager.fingerprint() if step in (1, total) else None)
        started.set()
        threading.Event().wait(0.05)  # give the editing thread every chance to interleave

    gen = threading.Thread(target=manager.generate, args=(GenerationRequest("a red circle", steps=8), progress))
    gen.start()
    started.wait(30)
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.0))  # must wait for the generation to finish
    gen.join()
    assert seen[0] is not None and seen[0] == seen[-1]
    assert manager.fingerprint() != seen[0]


def test_stop_request_ends_the_job_and_leaves_the_model_intact(manager):
    f, steps = manager.fingerprint(), []

    def progress(step, total):
        steps.append(step)
        if step == 2:
            manager.request_stop()

    with pytest.raises(JobStopped):
        manager.generate(GenerationRequest("a red circle", steps=20), progress)
    assert steps == [1, 2] and manager.fingerprint() == f
    assert manager.generate(GenerationRequest("a red circle", **FAST)).images  # the next job runs normally


def test_a_stop_during_an_outer_job_survives_nested_jobs(manager):
    """A training preview generates inside the training job: a stop pressed before or during it ends training."""
    with pytest.raises(JobStopped), manager.job():
        manager.request_stop()
        with manager.job():  # a nested job that ends without checking
            pass
        manager.check_stop()
    with pytest.raises(JobStopped), manager.job():
        manager.request_stop()
        manager.generate(GenerationRequest("a red circle", **FAST))  # the nested job sees the stop and ends
    with manager.job():
        manager.check_stop()  # the stop ended with the outermost job


def test_a_stop_requested_between_jobs_does_not_stop_the_next_one(manager):
    manager.request_stop()
    assert manager.generate(GenerationRequest("a red circle", **FAST)).images


@pytest.mark.parametrize("field,value,message", [
    ("width", 60, "multiple of 8"), ("height", 4096, "outside"), ("steps", 0, "steps"), ("steps", 10_000, "steps"),
    ("seed", "abc", "seed must be a whole number"), ("seed", "1.5", "seed"), ("guidance", "nan", "finite"),
    ("batch", 99, "batch size"), ("sampler", "Heun 3000", "unknown sampler"),
])
def test_bad_settings_give_clear_errors_and_change_nothing(manager, field, value, message):
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    f, rows = manager.fingerprint(), manager.history()
    req = GenerationRequest("a red circle", **FAST)
    setattr(req, field, value)
    with pytest.raises(StudioError, match=message):
        manager.generate(req)
    assert manager.fingerprint() == f and manager.history() == rows


def test_overlong_prompt_is_truncated_with_a_warning(manager):
    result = manager.generate(GenerationRequest("a red circle " * 40, **FAST))
    assert result.images and len(result.warnings) == 1 and "truncated" in result.warnings[0]
    assert not manager.generate(GenerationRequest("a red circle", **FAST)).warnings


def test_bad_edits_are_refused_without_touching_history(manager):
    f = manager.fingerprint()
    for pattern, factor in [("no_such_layer", 0.5), ("(", 0.5), (r"attn2\.to_v", float("nan"))]:
        with pytest.raises(StudioError):
            manager.apply(scale_edit(pattern, factor))
    assert manager.fingerprint() == f and manager.history() == []


def test_reset_and_redo(manager):
    f0 = manager.fingerprint()
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    manager.apply(scale_edit(r"attn2\.to_k\.weight", 2.0))
    f2 = manager.fingerprint()
    manager.reset()
    assert manager.fingerprint() == f0 and [r["applied"] for r in manager.history()] == [False, False]
    manager.redo(), manager.redo()
    assert manager.fingerprint() == f2 and manager.redo() is None


def test_cached_fingerprint_follows_the_stack(manager):
    f0 = manager.fingerprint(cached=True)
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    f1 = manager.fingerprint(cached=True)
    assert f1 != f0 and f1 == manager.fingerprint()
    manager.undo()
    assert manager.fingerprint(cached=True) == f0
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.25))  # a new edit at the same depth: a new state
    assert manager.fingerprint(cached=True) == manager.fingerprint() != f1
