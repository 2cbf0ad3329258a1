"""Model sources: the built-in model, diffusers folders, refused pickles, unknown paths."""
import pytest
import torch

from studio.errors import StudioError
from studio.fingerprint import fingerprint
from studio.loading import classify_source, load_pipeline, resolve_dtype
from studio.manager import PipelineManager


def test_builtin_demo_model_is_deterministic():
    a, info = load_pipeline("builtin", device="cpu")
    b, _ = load_pipeline("builtin", device="cpu")
    assert info.dtype == "float32" and info.device == "cpu"
    assert fingerprint(a) == fingerprint(b)


def test_diffusers_folder_round_trip(tmp_path, manager):
    manager.pipe.save_pretrained(tmp_path / "model", safe_serialization=True)
    other = PipelineManager(str(tmp_path / "model"), device="cpu")
    assert other.describe().startswith(str(tmp_path / "model"))
    assert other.fingerprint() == manager.fingerprint()


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoints_are_refused_without_the_flag(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(StudioError, match="allow-pickle"):
        PipelineManager(str(path))
    assert classify_source(str(path), allow_pickle=True) == "single-file"


def test_unknown_sources_are_clear_errors(tmp_path):
    with pytest.raises(StudioError, match="not found"):
        PipelineManager(str(tmp_path / "missing.safetensors"))
    with pytest.raises(StudioError, match="not found"):
        PipelineManager("definitely not a model")
    with pytest.raises(StudioError, match="model_index.json"):
        PipelineManager(str(tmp_path))
    assert classify_source("owner/some-model") == "hub"
    with pytest.raises(StudioError, match="no network"):
        load_pipeline("nobody-here/no-such-model-xyz", device="cpu")


def test_dtype_defaults():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(StudioError):
        resolve_dtype("fp8", torch.device("cpu"))


def test_switching_models_keeps_the_old_one_when_the_new_one_fails(manager, tmp_path):
    f = manager.fingerprint()
    with pytest.raises(StudioError):
        manager.load(str(tmp_path / "nope.safetensors"))
    assert manager.fingerprint() == f
