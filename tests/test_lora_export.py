"""LoRA export checked with diffusers' own loader: load + fuse into a fresh pipeline gives the edited weights."""
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from studio.edits import named_tensors
from studio.errors import StudioError
from studio.layer_scale import scale_edit
from studio.lora_export import export_lora, export_pipeline, lora_from_changes, weight_changes
from studio.manager import PipelineManager

TO_K = r"attn2\.to_k\.weight"
TE = r"text_encoder\..*encoder\.layers\.0\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])\.(weight|bias)"
K0 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
ATOL = 1e-5  # fp32 SVD round trip of a full-rank delta; measured ~1e-7


def test_full_rank_lora_fuses_to_the_edited_weights(manager, tmp_path):
    manager.apply(scale_edit(TO_K, 0.5))
    manager.apply(scale_edit(TE, 1.3))
    manager.apply(scale_edit(r"attn1\.to_out\.0\.bias", 2.0))  # not LoRA-expressible: skipped
    path = tmp_path / "edit.safetensors"
    report = export_lora(manager, path, rank=128)  # 128 = largest dim: full rank (64-wide layers capped)

    assert {m["rank"] for m in report["modules"].values()} == {64, 128}
    assert report["error"] < 1e-5 and report["max_error"] < 1e-5
    assert any(n.endswith("attn1.to_out.0.bias") for n in report["skipped"])
    assert any(n.endswith("self_attn.q_proj.bias") for n in report["skipped"])
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.alpha" in keys
    assert meta["ss_network_dim"] == "128" and meta["ss_network_alpha"] == "128"
    assert len(json.loads(meta["studio_edits"])) == 3

    fresh = PipelineManager("builtin", device="cpu").pipe
    before = {n: t.detach().clone() for n, t in named_tensors(fresh).items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_lora_weights(str(path))
    assert not [w for w in caught if "did not match" in str(w.message)]  # every key and alpha found its module
    fresh.fuse_lora()
    fresh.unload_lora_weights()
    fused, edited = named_tensors(fresh), named_tensors(manager.pipe)
    assert set(fused) == set(edited)
    exported = set(report["modules"])
    assert any(n.startswith("text_encoder.") for n in exported) and any(n.startswith("unet.") for n in exported)
    for name, t in fused.items():
        if name in exported:
            torch.testing.assert_close(t, edited[name], atol=ATOL, rtol=0, msg=name)
        else:
            assert torch.equal(t, before[name]), f"{name} changed but was not in the LoRA"


def test_low_rank_error_is_reported_and_falls_with_rank(manager):
    manager.apply(scale_edit(TO_K, 0.5))
    manager.apply(scale_edit(TE, 1.3))
    changes = weight_changes(manager)
    errors = []
    for rank in (1, 4, 16, 64):
        state, report = lora_from_changes(changes, rank)
        errors.append(report["error"])
        fc1 = "lora_te_text_model_encoder_layers_0_mlp_fc1"
        assert state[f"{fc1}.lora_up.weight"].shape == (512, rank)
        assert state[f"{fc1}.lora_down.weight"].shape == (rank, 128)
        assert all(0 <= m["error"] <= 1 for m in report["modules"].values())
    assert errors[0] > errors[1] > errors[2] > errors[3] > 0
    assert lora_from_changes(changes, 512)[1]["error"] < 1e-5
    # without a pipe, embeddings are still recognised as not-Linear
    emb = "text_encoder.text_model.embeddings.token_embedding.weight"
    w = torch.randn(10, 4)
    assert emb in lora_from_changes({emb: (w, w * 2)}, 2)[1]["skipped"]


def test_weight_changes_since(manager):
    loaded = named_tensors(manager.pipe)[K0].detach().clone()
    q0 = next(n for n in named_tensors(manager.pipe)
              if n.startswith("text_encoder.") and n.endswith("layers.0.self_attn.q_proj.weight"))
    manager.apply(scale_edit(TO_K, 0.5))
    manager.apply(scale_edit(TO_K, 3.0))
    manager.apply(scale_edit(r"layers\.0\.self_attn\.q_proj\.weight", 2.0))
    original, current = weight_changes(manager)[K0]
    assert torch.equal(original, loaded) and torch.allclose(current, loaded * 1.5)
    original, current = weight_changes(manager, since=1)[K0]
    assert torch.allclose(original, loaded * 0.5)
    assert set(weight_changes(manager, since=2)) == {q0}
    assert weight_changes(manager, since=3) == {}
    with pytest.raises(StudioError, match="since"):
        weight_changes(manager, since=4)


def test_bad_inputs_are_refused(manager, tmp_path):
    with pytest.raises(StudioError, match="nothing to export"):
        export_lora(manager, tmp_path / "a.safetensors")
    manager.apply(scale_edit(r"attn1\.to_out\.0\.bias", 2.0))
    with pytest.raises(StudioError, match="nothing to export.*bias"):
        export_lora(manager, tmp_path / "a.safetensors")
    manager.apply(scale_edit(TO_K, 0.5))
    with pytest.raises(StudioError, match=r"\.safetensors"):
        export_lora(manager, tmp_path / "a.ckpt")
    with pytest.raises(StudioError, match="rank"):
        export_lora(manager, tmp_path / "a.safetensors", rank=0)
    with pytest.raises(StudioError, match="since"):
        export_lora(manager, tmp_path / "a.safetensors", since=7)
    assert not list(tmp_path.iterdir())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StudioError, match="not empty"):
        export_pipeline(manager, tmp_path / "full")


def test_export_pipeline_round_trips(manager, tmp_path):
    from diffusers import StableDiffusionPipeline

    manager.apply(scale_edit(TO_K, 0.5))
    folder = export_pipeline(manager, tmp_path / "model")
    assert list(folder.glob("unet/*.safetensors"))
    loaded = StableDiffusionPipeline.from_pretrained(folder)
    assert torch.equal(named_tensors(loaded)[K0], named_tensors(manager.pipe)[K0])
