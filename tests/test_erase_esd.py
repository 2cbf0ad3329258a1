"""ESD erasure trained as a LoRA: it erases on the toy model, applies as one exact edit, stops cleanly."""
import pytest
import torch

from studio.edits import named_tensors
from studio.erase.esd import METHODS, neutral_prompt, target_modules, train_esd, with_strength
from studio.errors import JobStopped, StudioError
from studio.toyworld.evaluate import presence_rate

RED_CAPTIONS = ["a red star", "a red triangle", "a photo of a red star", "a picture of a red triangle",
                "a red star on the left", "a red triangle at the top", "a red star and a blue triangle",
                "a green star and a red triangle"]
TINY = dict(steps=3, sample_steps=4, trajectories=2, lr=1e-3)  # just enough to get a non-zero adapter


def snapshot(manager) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in named_tensors(manager.pipe).items()}


def assert_same(manager, before: dict[str, torch.Tensor]) -> None:
    now = named_tensors(manager.pipe)
    assert now.keys() == before.keys()
    changed = [n for n, t in now.items() if not torch.equal(t, before[n])]
    assert not changed, changed[:5]


def no_hooks_left(manager) -> bool:
    return all(not m._forward_hooks for m in manager.pipe.unet.modules())


def test_esd_erases_red_and_keeps_blue(manager):
    red, blue = ["a red circle", "a red square"], ["a blue circle", "a blue square"]
    measure = dict(seeds=4, steps=10)
    before = presence_rate(manager, red, "red", **measure), presence_rate(manager, blue, "blue", **measure)
    assert before[0] >= 0.75 and before[1] >= 0.75, before
    previews = []
    # red circles and squares are held out: training sees the word in star and triangle captions only
    edit = train_esd(manager, "red", concept_prompts=RED_CAPTIONS, steps=40, lr=1e-2, batch=2, sample_steps=10,
                     trajectories=8, seed=0, preview=lambda s, ims: previews.append((s, ims)), preview_every=20,
                     preview_seeds=1)
    assert [s for s, _ in previews] == [20, 40] and previews[0][1][0].size == (64, 64)
    manager.apply(edit)
    assert len(manager.history()) == 1 and "ESD-x erase 'red' (LoRA r2)" in manager.history()[0]["edit"]
    after = presence_rate(manager, red, "red", **measure), presence_rate(manager, blue, "blue", **measure)
    assert after[0] <= before[0] - 0.5, (before, after)
    assert after[1] >= 0.75, (before, after)


def test_training_leaves_the_model_alone_and_undo_is_exact(manager):
    before, fp = snapshot(manager), manager.fingerprint()
    edit = train_esd(manager, "red", **TINY)
    assert_same(manager, before)  # training only ever used hooks
    assert no_hooks_left(manager)
    assert edit.kind == "esd_lora" and edit.params["method"] == "esd-x" and edit.params["strength"] == 1.0
    names = edit.params["modules"]
    assert names and all(".attn2." in n and n.endswith(".weight") for n in names)
    assert set(edit.tensors) == {f"{n}.lora_{x}" for n in names for x in "AB"}
    a, b = edit.tensors[f"{names[0]}.lora_A"], edit.tensors[f"{names[0]}.lora_B"]
    assert a.shape[0] == b.shape[1] == 2 and b.abs().max() > 0

    entry = manager.apply(edit)
    merged = named_tensors(manager.pipe)
    assert sorted(entry.patch.originals) == sorted(names)
    assert torch.allclose(merged[names[0]], before[names[0]] + b @ a, atol=1e-6)
    assert manager.fingerprint() != fp
    manager.undo()
    assert_same(manager, before)
    assert manager.fingerprint() == fp
    manager.redo()
    assert torch.equal(named_tensors(manager.pipe)[names[0]], entry.patch.results[names[0]])


def test_saved_esd_edit_reapplies_exactly(manager, tmp_path):
    edit = train_esd(manager, "red", method="esd-u", rank=1, **TINY)
    assert not any(".attn2." in n for n in edit.params["modules"])
    manager.apply(edit)
    applied, fp = snapshot(manager), manager.fingerprint()
    path = manager.save_edits(tmp_path / "esd.safetensors")
    manager.undo()
    notes = manager.load_edits(path)
    assert notes == [f"{edit.title}: re-applied exactly"]
    assert_same(manager, applied)
    assert manager.fingerprint() == fp


def test_stop_request_ends_training_and_leaves_the_model_untouched(manager):
    before = snapshot(manager)
    flags = {n: p.requires_grad for n, p in manager.pipe.unet.named_parameters()}
    seen = []

    def progress(done, total):
        seen.append((done, total))
        if done == 2:
            manager.request_stop()

    with pytest.raises(JobStopped):  # during the trajectory sampling
        train_esd(manager, "red", steps=50, sample_steps=4, trajectories=2, progress=progress)
    assert seen == [(1, 54), (2, 54)]  # 4 batched sampling steps for the trajectories, then 50 training steps
    assert_same(manager, before)
    assert no_hooks_left(manager)
    seen.clear()

    def progress(done, total):
        seen.append((done, total))
        if done == 6:
            manager.request_stop()

    with pytest.raises(JobStopped):  # during training
        train_esd(manager, "red", steps=50, sample_steps=4, trajectories=2, progress=progress)
    assert len(seen) == 6
    assert_same(manager, before)
    assert no_hooks_left(manager)
    assert flags == {n: p.requires_grad for n, p in manager.pipe.unet.named_parameters()}
    assert manager.history() == []
    # the manager is usable again: the stop was for that job only
    assert train_esd(manager, "red", **TINY).kind == "esd_lora"


def test_strength_scales_the_merged_adapter(manager):
    before = snapshot(manager)
    edit = train_esd(manager, "red", method="esd-x-kv", **TINY)
    names = edit.params["modules"]
    assert names and all(n.split(".")[-2] in ("to_k", "to_v") for n in names)
    manager.apply(with_strength(edit, 0.0))
    now = named_tensors(manager.pipe)
    for n, t in before.items():
        assert torch.allclose(now[n], t, atol=1e-7), n
    manager.undo()

    half, full = with_strength(edit, 0.5), edit
    assert half.tensors is edit.tensors and half.params["strength"] == 0.5 and "x0.5" in half.title
    manager.apply(half)
    w_half = named_tensors(manager.pipe)[names[0]].clone()
    manager.undo()
    manager.apply(full)
    w_full = named_tensors(manager.pipe)[names[0]].clone()
    assert torch.allclose(w_half - before[names[0]], 0.5 * (w_full - before[names[0]]), atol=1e-6)


class Untouchable:
    """A manager that fails the test if anything touches it: bad settings must be refused first."""

    def __getattr__(self, name):
        raise AssertionError(f"train_esd touched manager.{name} before refusing bad input")


@pytest.mark.parametrize("kwargs, message", [
    (dict(concept="  "), "concept to erase is empty"),
    (dict(concept="red", method="esd-z"), "unknown ESD method 'esd-z'"),
    (dict(concept="red", rank=0), "LoRA rank must be from 1 to 4"),
    (dict(concept="red", rank=1.5), "LoRA rank must be a whole number"),
    (dict(concept="red", lr=0), "learning rate must be a number above 0"),
    (dict(concept="red", steps=-3), "training steps must be from 1"),
    (dict(concept="red", eta=float("nan")), "eta"),
    (dict(concept="red", batch=0), "batch size"),
])
def test_bad_input_is_a_clear_error_before_anything_runs(kwargs, message):
    concept = kwargs.pop("concept")
    with pytest.raises(StudioError, match=message):
        train_esd(Untouchable(), concept, **kwargs)


def test_bad_strength_and_damaged_edits_are_refused(manager):
    edit = train_esd(manager, "red", rank=1, **TINY)
    with pytest.raises(StudioError, match="strength"):
        with_strength(edit, float("inf"))
    name = edit.params["modules"][0]
    damaged = type(edit)(edit.kind, edit.params, {k: v for k, v in edit.tensors.items() if k != f"{name}.lora_B"})
    before = snapshot(manager)
    with pytest.raises(StudioError, match="lacks the adapter tensors"):
        manager.apply(damaged)
    assert_same(manager, before)


def test_published_sampling_and_anchoring_paths_run(manager):
    before = snapshot(manager)
    fresh = train_esd(manager, "red", anchor_weight=1.0, batch=2, **{**TINY, "trajectories": 0})
    named = train_esd(manager, "red", concept_prompts="a red star\nred\n", anchor_weight=0.5,
                      anchor_prompts=["a blue star", " "], **TINY)
    assert fresh.params["trajectories"] == 0 and fresh.params["anchor_prompts"] == []
    assert named.params["concept_prompts"] == ["a red star"] and named.params["anchor_prompts"] == ["a blue star"]
    assert all(0 <= e.params["residual"] < 10 and e.params["residual_curve"] for e in (fresh, named))
    assert_same(manager, before)


def test_neutral_prompts_remove_only_the_concept():
    assert neutral_prompt("red", "red") == ""
    assert neutral_prompt("a red star", "red") == "a star"
    assert neutral_prompt("a red apple", "red") == "an apple"
    assert neutral_prompt("a scarlet star", "red") == ""  # a paraphrase steers to the empty prompt
    assert neutral_prompt("a painting by Van Gogh", "van gogh") == "a painting by"


def test_method_layer_sets(manager):
    unet = manager.pipe.unet
    x, kv, u = (set(target_modules(unet, m)) for m in ("esd-x", "esd-x-kv", "esd-u"))
    assert set(METHODS) == {"esd-x", "esd-x-kv", "esd-u"}
    assert kv < x and not (x & u) and u
    assert all(".attn1." in n or ".ff." in n for n in u)
