"""Edit files: saved stacks re-apply exactly after a restart, and transfer to a sibling model."""
import pytest
import torch

from studio.demo_model import build_demo_pipeline
from studio.edits import EDIT_KINDS, named_tensors
from studio.errors import StudioError
from studio.layer_scale import scale_edit
from studio.manager import PipelineManager


def test_saved_edits_reapplied_to_a_fresh_model_give_the_same_fingerprint(manager, tmp_path):
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    manager.apply(scale_edit(r"text_encoder\..*layers\.1\.mlp", -1.25))
    path = manager.save_edits(tmp_path / "edits.safetensors")
    fresh = PipelineManager("builtin", device="cpu")
    notes = fresh.load_edits(path)
    assert notes == [f"{e.edit.title}: re-applied exactly" for e in manager.stack.applied]
    assert fresh.fingerprint() == manager.fingerprint()
    assert [r["edit"] for r in fresh.history()] == [r["edit"] for r in manager.history()]
    fresh.reset()
    assert fresh.fingerprint() == PipelineManager("builtin", device="cpu").fingerprint()


def test_edit_file_transfers_to_another_model_of_the_same_architecture(manager, tmp_path):
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    path = manager.save_edits(tmp_path / "e.safetensors")
    other = PipelineManager.from_pipeline(build_demo_pipeline(seed=1))  # same architecture, other weights
    original = {n: t.clone() for n, t in named_tensors(other.pipe).items()}
    assert "recomputed" in other.load_edits(path)[0]
    for name, t in named_tensors(other.pipe).items():
        expected = original[name] * 0.5 if "attn2.to_v.weight" in name else original[name]
        assert torch.equal(t, expected), name


def test_load_is_all_or_nothing(manager, tmp_path, monkeypatch):
    manager.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    manager.apply(scale_edit(r"attn2\.to_k\.weight", 0.5))
    path = manager.save_edits(tmp_path / "e.safetensors")
    other = PipelineManager("builtin", device="cpu")
    calls, real = [], EDIT_KINDS["scale"]

    def second_one_fails(pipe, params, tensors, patch):
        calls.append(1)
        real(pipe, params, tensors, patch)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")

    monkeypatch.setitem(EDIT_KINDS, "scale", second_one_fails)
    f = other.fingerprint()
    with pytest.raises(StudioError, match="disk on fire"):
        other.load_edits(path)
    assert other.fingerprint() == f and other.history() == []


def test_files_that_are_not_edit_files_are_refused(manager, tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(StudioError, match="no applied edits"):
        manager.save_edits(tmp_path / "e.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "weights.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    for name, message in [("weights.safetensors", "not a Concept Studio edit file"),
                          ("junk.safetensors", "not a readable"), ("none.safetensors", "not found")]:
        with pytest.raises(StudioError, match=message):
            manager.load_edits(tmp_path / name)
    assert manager.history() == []
