"""The edit stack: exact undo/redo under random histories, atomic failure, non-weight edits."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from studio.edits import Edit, EditStack, edit_kind, named_tensors
from studio.errors import EditError, StudioError


def toy_pipe():
    torch.manual_seed(0)
    return SimpleNamespace(
        text_encoder=nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 6)),
        unet=nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 3)).half(),  # fp16: add/sub drift would show here
        vae=None,
    )


@edit_kind("test_perturb")
def _perturb(pipe, params, tensors, patch):
    g = torch.Generator().manual_seed(params["seed"])
    names = sorted(named_tensors(pipe))
    for i in torch.randperm(len(names), generator=g)[: params["count"]].tolist():
        t = patch.read(names[i]).float()
        patch.write(names[i], torch.zeros_like(t))  # a second write must not replace the backup
        # an fp16 update whose delta is not exactly representable: undo by subtraction would drift
        patch.write(names[i], t * -0.9 + torch.randn(t.shape, generator=g) * 0.3)


@edit_kind("test_fail_halfway")
def _fail(pipe, params, tensors, patch):
    for name in sorted(named_tensors(pipe))[:3]:
        patch.write(name, torch.zeros_like(patch.read(name)))
    patch.set_attr(pipe, "tokenizer", "swapped")
    raise RuntimeError("boom")


@edit_kind("test_swap")
def _swap(pipe, params, tensors, patch):
    patch.set_attr(pipe.unet, "0", nn.Linear(6, 6).half())


def snapshot(pipe):
    return {n: t.detach().clone() for n, t in named_tensors(pipe).items()}


def same(a, b):
    return a.keys() == b.keys() and all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)


ops = st.lists(st.tuples(st.sampled_from(["apply", "undo", "redo", "goto"]), st.integers(0, 10_000)), max_size=40)


@settings(max_examples=60, deadline=None)
@given(ops)
def test_random_histories_are_bit_exact(sequence):
    pipe = toy_pipe()
    stack = EditStack(pipe)
    states = [snapshot(pipe)]  # states[k]: parameters with the first k edits applied
    for op, arg in sequence:
        if op == "apply":
            stack.apply(Edit("test_perturb", {"seed": arg, "count": 1 + arg % 4}))
            del states[stack.position:]
            states.append(snapshot(pipe))
        elif op == "undo":
            stack.undo()
        elif op == "redo":
            stack.redo()
        else:
            stack.goto(arg % (len(stack.entries) + 1))
        assert len(states) == len(stack.entries) + 1
        assert same(snapshot(pipe), states[stack.position])


def test_undo_restores_by_copy_not_by_subtraction():
    pipe = toy_pipe()
    stack = EditStack(pipe)
    before = snapshot(pipe)
    for seed in range(20):
        stack.apply(Edit("test_perturb", {"seed": seed, "count": 4}))
    after = snapshot(pipe)
    for _ in range(3):
        stack.goto(0)
        assert same(snapshot(pipe), before)
        stack.goto(20)
        assert same(snapshot(pipe), after)


def test_failing_edit_leaves_model_and_history_untouched():
    pipe = toy_pipe()
    pipe.tokenizer = "original"
    stack = EditStack(pipe)
    stack.apply(Edit("test_perturb", {"seed": 1, "count": 2}))
    stack.apply(Edit("test_perturb", {"seed": 2, "count": 2}))
    stack.undo()  # keep a redo tail: a failed apply must not drop it
    before, rows = snapshot(pipe), stack.rows()
    with pytest.raises(EditError, match="rolled back"):
        stack.apply(Edit("test_fail_halfway"))
    assert same(snapshot(pipe), before) and stack.rows() == rows and pipe.tokenizer == "original"
    assert stack.redo() is not None


def test_nan_results_are_refused_and_rolled_back():
    @edit_kind("test_nan")
    def _nan(pipe, params, tensors, patch):
        name = sorted(named_tensors(pipe))[0]
        patch.write(name, patch.read(name) * 2)
        patch.write(sorted(named_tensors(pipe))[1], torch.full_like(patch.read(sorted(named_tensors(pipe))[1]), float("nan")))

    pipe = toy_pipe()
    stack, before = EditStack(pipe), snapshot(pipe)
    with pytest.raises(EditError, match="NaN"):
        stack.apply(Edit("test_nan"))
    assert same(snapshot(pipe), before) and not stack.entries


def test_non_weight_edit_is_installed_and_removed():
    pipe = toy_pipe()
    stack = EditStack(pipe)
    original = pipe.unet[0]
    stack.apply(Edit("test_swap"))
    swapped = pipe.unet[0]
    assert swapped is not original
    stack.undo()
    assert pipe.unet[0] is original
    stack.redo()
    assert pipe.unet[0] is swapped


def test_unknown_kind_and_bad_shapes_are_clear_errors():
    pipe = toy_pipe()
    stack = EditStack(pipe)
    with pytest.raises(StudioError, match="unknown edit kind"):
        stack.apply(Edit("no_such_kind"))

    @edit_kind("test_bad_shape")
    def _bad(pipe, params, tensors, patch):
        patch.write("unet.0.weight", torch.zeros(2, 2))

    with pytest.raises(StudioError, match="shape"):
        stack.apply(Edit("test_bad_shape"))
    with pytest.raises(StudioError, match="outside"):
        stack.goto(5)
