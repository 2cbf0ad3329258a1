"""Learned concepts exported in other tools' formats and imported back (studio/customize/formats.py).

Round trips must give the very same images; diffusers' own loaders (load_textual_inversion,
load_lora_weights + fuse, load_attn_procs) on a fresh copy of the model must give images close to
ours with the concept applied. Kept fast: the concepts are trained for one step at a high rate
(enough to change the images a lot), images are 64x64 with 10 sampling steps.
"""
import copy
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from studio.customize.concept import with_strength
from studio.customize.formats import CD_WEIGHTS, EMBEDS, export_concept, import_concept, lora_state
from studio.customize.train import train_concept
from studio.edits import Edit
from studio.errors import StudioError
from studio.generation import GenerationRequest
from studio.images import to_tensor
from studio.manager import PipelineManager
from studio.training import TrainingImage

PROMPT = "a <x> on the grass"
K0 = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
CONV = "unet.down_blocks.0.resnets.0.conv1.weight"
CLOSE = 0.5  # mean |difference| (0..255) allowed between diffusers' images and ours; measured 0 for the
# embedding and the fused LoRA, 1e-4 (a few pixels off by 1) for Custom Diffusion's own attention code


@pytest.fixture(scope="module")
def mgr():
    # One intra-op thread: the toy model gains nothing from two, and with another job on the 2 cores,
    # two spinning threads made each 10-step image take 10-50 s instead of 0.5 s (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    m = PipelineManager("builtin", device="cpu")
    m.pipe
    yield m
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def clean(mgr):
    mgr.reset()
    yield
    mgr.reset()


@pytest.fixture(scope="module")
def concepts(mgr):
    rng = np.random.default_rng(0)
    images = [TrainingImage(to_tensor(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))), None)
              for _ in range(3)]
    lora = train_concept(mgr, images, "<x>", method="lora", lora_targets="unet", steps=1, batch=1, lr=0.05,
                         token_lr=0.5)
    cd = train_concept(mgr, images, "<x>", method="custom_diffusion", steps=1, batch=1, lr=0.02, token_lr=0.5)
    ti = Edit("learned_concept", {**lora.params, "method": "ti", "modules": []},
              {"embedding": lora.tensors["embedding"]})
    return {"lora": lora, "cd": cd, "ti": ti}


def image(manager, prompt=PROMPT) -> np.ndarray:
    return np.asarray(manager.generate(GenerationRequest(prompt, seed=3, steps=10)).images[0]).astype(np.int16)


def with_edit(manager, edit) -> np.ndarray:
    manager.apply(edit)
    try:
        return image(manager)
    finally:
        manager.undo()


@pytest.fixture(scope="module")
def base_image(mgr):
    return image(mgr)


def fresh_copy(mgr):
    assert mgr.stack.position == 0
    return copy.deepcopy(mgr.pipe)


def assert_close_not_base(theirs, ours, base):
    diff = np.abs(theirs - ours).mean()
    assert diff < CLOSE, diff
    assert np.abs(ours - base).mean() > 10 * CLOSE  # the concept really changes the image


def test_embedding_round_trip_and_diffusers(mgr, concepts, base_image, tmp_path):
    ti = concepts["ti"]
    out = export_concept(ti, tmp_path, formats=("embedding",))
    assert not out["errors"]
    path = tmp_path / "x.safetensors"  # A1111 calls an embedding by its file name
    assert out["written"]["embedding"] == [str(path)]
    saved = load_file(str(path))
    assert set(saved) == {"emb_params"} and torch.equal(saved["emb_params"], ti.tensors["embedding"])

    ours = with_edit(mgr, ti)
    back = import_concept(path, pipe=mgr)
    assert back.params["token"] == "<x>" and back.params["modules"] == []
    assert np.array_equal(with_edit(mgr, back), ours)

    fresh = fresh_copy(mgr)
    fresh.load_textual_inversion(str(path), token="<x>")
    assert_close_not_base(image(PipelineManager.from_pipeline(fresh)), ours, base_image)

    # the other embedding files: diffusers' learned_embeds and an A1111 .pt (read with weights_only)
    emb = ti.tensors["embedding"]
    save_file({"<x>": emb[0].clone()}, str(tmp_path / "learned_embeds.safetensors"))
    torch.save({"string_to_token": {"*": torch.tensor(265)}, "string_to_param": {"*": emb.clone()},
                "name": "<x>", "step": 100}, tmp_path / "x.pt")
    for name in ("learned_embeds.safetensors", "x.pt"):
        other = import_concept(tmp_path / name, pipe=mgr)
        assert other.params["token"] == "<x>" and torch.equal(other.tensors["embedding"], emb), name
    assert import_concept(tmp_path / "x.pt", token="<y>").params["token"] == "<y>"


def test_lora_round_trip_and_diffusers(mgr, concepts, base_image, tmp_path):
    lora = concepts["lora"]
    out = export_concept(lora, tmp_path, formats=("embedding", "lora"), model=mgr)
    assert "custom_diffusion" not in out["errors"] and not out["errors"]
    report, path = out["lora"], tmp_path / "x-lora.safetensors"
    assert report["error"] == 0 and {m["source"] for m in report["modules"].values()} == {"factors"}
    assert set(report["modules"]) == set(lora.params["modules"])
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        conv_down = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight")
        alpha = f.get_tensor("lora_unet_down_blocks_0_resnets_0_conv1.alpha")
    assert conv_down.shape == (4, 64, 3, 3) and float(alpha) == 4 and meta["ss_network_dim"] == "4"
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight" in keys
    assert torch.equal(conv_down, lora.tensors[f"{CONV}.lora_A"])  # the factors themselves, no SVD

    ours = with_edit(mgr, lora)
    back = import_concept([tmp_path / "x.safetensors", path], pipe=mgr)
    assert back.params["token"] == "<x>" and back.params["modules"] == sorted(lora.params["modules"])
    assert np.array_equal(with_edit(mgr, back), ours)
    weights_only = import_concept(path, pipe=mgr)  # the LoRA alone: a weights-only concept
    assert weights_only.params["token"] is None and "embedding" not in weights_only.tensors
    assert all(torch.equal(t, lora.tensors[n]) for n, t in weights_only.tensors.items())

    fresh = fresh_copy(mgr)
    fresh.load_textual_inversion(str(tmp_path / "x.safetensors"), token="<x>")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fresh.load_lora_weights(str(path))
    assert not [w for w in caught if "did not match" in str(w.message)]  # every key and alpha found its layer
    fresh.fuse_lora()
    fresh.unload_lora_weights()
    assert_close_not_base(image(PipelineManager.from_pipeline(fresh)), ours, base_image)


def test_custom_diffusion_round_trip_and_diffusers(mgr, concepts, base_image, tmp_path):
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor

    cd = concepts["cd"]
    mgr.apply(with_strength(cd, scope="always"))  # merged in: the full weights are the base's plus the change, once
    applied_k0 = mgr.pipe.unet.get_parameter(K0.removeprefix("unet.")).detach().clone()
    out = export_concept(cd, tmp_path, rank=4, model=mgr)  # exported while merged in: still the change once
    mgr.undo()
    ours = with_edit(mgr, cd)
    assert not out["errors"], out["errors"]
    folder = tmp_path / "x-custom-diffusion"
    state = load_file(str(folder / CD_WEIGHTS))
    procs = mgr.pipe.unet.attn_processors
    assert {k.rsplit(".processor", 1)[0] + ".processor" for k in state} == set(procs)  # one entry per attention
    key = K0.removeprefix("unet.").replace(".to_k.weight", ".processor.to_k_custom_diffusion.weight")
    assert torch.equal(state[key], applied_k0)
    assert all(v.numel() == 0 for k, v in state.items() if ".attn1." in k)
    assert set(load_file(str(folder / EMBEDS))) == {"<x>"}
    # the same deltas as a LoRA: truncated SVD, error reported, exact at full rank
    assert 0 < out["lora"]["error"] < 1 and {m["source"] for m in out["lora"]["modules"].values()} == {"svd"}
    assert lora_state(cd, rank=128)[1]["error"] < 1e-5

    back = import_concept(folder, pipe=mgr)
    assert back.params["token"] == "<x>" and back.params["modules"] == sorted(cd.params["modules"])
    assert np.array_equal(with_edit(mgr, back), ours)

    fresh = fresh_copy(mgr)
    fresh.load_textual_inversion(str(folder))
    # diffusers 0.42 installs the processors only with _pipeline (issue #9320)
    fresh.unet.load_attn_procs(str(folder), weight_name=CD_WEIGHTS, _pipeline=fresh)
    assert isinstance(fresh.unet.attn_processors[key.rsplit(".", 2)[0]], CustomDiffusionAttnProcessor)
    assert_close_not_base(image(PipelineManager.from_pipeline(fresh)), ours, base_image)
    # what diffusers' own save_attn_procs writes (safetensors without the placeholders, or a .bin with
    # empty dicts, read with weights_only) imports to the same changes
    for safe in (True, False):
        fresh.unet.save_attn_procs(str(tmp_path / f"diffusers-{safe}"), safe_serialization=safe)
        weights = next((tmp_path / f"diffusers-{safe}").iterdir())
        again = import_concept([weights, folder / EMBEDS], pipe=mgr)
        assert again.tensors.keys() == back.tensors.keys(), safe
        assert all(torch.equal(t, back.tensors[n]) for n, t in again.tensors.items()), safe


def test_kohya_lora_with_original_sd_block_names(mgr, tmp_path):
    """Some tools write SD-1 LoRAs with the original UNet's block names (input_blocks_1_1 = down_blocks.0
    attentions.0, output_blocks_3_1 = up_blocks.1 attentions.1 here); they map to the same layers, alpha/rank
    folded into up."""
    g = torch.Generator().manual_seed(0)
    layers = {"lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k": (128, 64),
              "lora_unet_middle_block_1_proj_in": (128, 128),
              "lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_2": (512, 128),
              "lora_te_text_model_encoder_layers_0_mlp_fc1": (128, 512)}
    state = {}
    for key, (fan_in, fan_out) in layers.items():
        state[f"{key}.lora_down.weight"] = torch.randn(2, fan_in, generator=g)
        state[f"{key}.lora_up.weight"] = torch.randn(fan_out, 2, generator=g)
        state[f"{key}.alpha"] = torch.tensor(1.0)
    state["bundle_emb.<ldm>.string_to_param.*"] = torch.randn(2, 128, generator=g)  # A1111's bundled trigger
    save_file(state, str(tmp_path / "ldm.safetensors"))
    edit = import_concept(tmp_path / "ldm.safetensors", pipe=mgr)
    assert edit.params["token"] == "<ldm>"
    assert torch.equal(edit.tensors["embedding"], state["bundle_emb.<ldm>.string_to_param.*"])
    assert [n.split(".", 1)[1] for n in edit.params["modules"]] == [
        "encoder.layers.0.mlp.fc1.weight" if not hasattr(mgr.pipe.text_encoder, "text_model")
        else "text_model.encoder.layers.0.mlp.fc1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "mid_block.attentions.0.proj_in.weight",
        "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2.weight"]
    up = state["lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k.lora_up.weight"]
    assert torch.equal(edit.tensors[f"{K0}.lora_B"], up * 0.5)
    before = mgr.fingerprint()
    mgr.apply(edit)  # the 1x1-conv proj_in takes a flat LoRA
    assert mgr.fingerprint() != before


class Payload:
    """Unpickling this would create a file: a stand-in for code a pickle can run."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": torch.zeros(1, 128)}, "extra": Payload(marker)}, tmp_path / "bad.pt")
    with pytest.raises(StudioError, match="pickle checkpoint: convert it to safetensors"):
        import_concept(tmp_path / "bad.pt")
    assert not marker.exists()


def test_wrong_architecture_is_refused_and_the_model_is_unchanged(mgr, tmp_path):
    before, position = mgr.fingerprint(), mgr.stack.position
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    cases = {  # file -> what the error says
        "sd15-lora.safetensors": ({f"{attn}.lora_down.weight": torch.zeros(4, 768),  # SD-1.5 text width
                                   f"{attn}.lora_up.weight": torch.zeros(64, 4), f"{attn}.alpha": torch.tensor(4.0)},
                                  "another architecture"),
        "deeper-lora.safetensors": ({"lora_unet_down_blocks_3_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                                     "lora_unet_down_blocks_3_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)},
                                    "not in it"),
        "sdxl-lora.safetensors": ({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
                                   "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)},
                                  "SDXL"),
        "wide.safetensors": ({"emb_params": torch.zeros(2, 768)}, "width 768"),
        "cd.safetensors": ({key: torch.zeros(320, 768) for key in
                            ["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight",
                             "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight"]},
                           "another architecture"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / name))
        with pytest.raises(StudioError, match=message):
            import_concept(tmp_path / name, token="<new>", pipe=mgr)
    # without the model to check against, the edit is refused when applied, and rolled back
    edit = import_concept(tmp_path / "wide.safetensors", token="<new>")
    with pytest.raises(StudioError, match="another model"):
        mgr.apply(edit)
    assert mgr.fingerprint() == before and mgr.stack.position == position


def test_bad_files_and_tokens(mgr, concepts, tmp_path):
    save_file({"emb_params": concepts["ti"].tensors["embedding"]}, str(tmp_path / "cat.safetensors"))
    with pytest.raises(StudioError, match="already a word"):
        import_concept(tmp_path / "cat.safetensors", pipe=mgr)  # A1111 would call it "cat"
    assert import_concept(tmp_path / "cat.safetensors", token="<cat>", pipe=mgr).params["token"] == "<cat>"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 2)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(StudioError, match="unknown file contents"):
        import_concept(tmp_path / "ckpt.safetensors", pipe=mgr)
    save_file({}, str(tmp_path / "empty.safetensors"))
    (tmp_path / "zero.pt").write_bytes(b"")
    for name in ("empty.safetensors", "zero.pt"):
        with pytest.raises(StudioError, match="empty"):
            import_concept(tmp_path / name, pipe=mgr)
    lora_file = export_concept(concepts["lora"], tmp_path / "out", formats="lora")["written"]["lora"][0]
    with pytest.raises(StudioError, match="needs the model"):
        import_concept(lora_file)
    out = export_concept(concepts["lora"], tmp_path / "out", formats=("custom_diffusion",), model=mgr)
    assert "only attention projections" in out["errors"]["custom_diffusion"] and not out["written"]
    with pytest.raises(StudioError, match="unknown export format"):
        export_concept(concepts["lora"], tmp_path, formats=("ckpt",))
