"""Scoped concepts: their UNet changes act only on images whose prompt uses the token; undo is exact."""
import numpy as np
import pytest
import torch

from studio import steering
from studio.customize.concept import base_signature, with_strength
from studio.customize.formats import export_concept, import_concept
from studio.customize.scope import ScopedChange
from studio.edits import Edit
from studio.errors import StudioError
from studio.generation import GenerationRequest

CONV = "unet.down_blocks.0.resnets.0.conv2.weight"  # 3x3 conv at the latent's full size
LINEAR = "unet.up_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"  # pixels as tokens
KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"  # prompt tokens


def lora_concept(pipe, token="<zz>", scope="prompt", size=0.5, seed=0) -> Edit:
    """A hand-made concept: a token and strong rank-2 LoRA changes on a conv, a pixel linear and a key."""
    g = torch.Generator().manual_seed(seed)
    emb = pipe.text_encoder.get_input_embeddings().weight
    tensors = {"embedding": emb.mean(0, keepdim=True) + emb.std() * torch.randn(1, emb.shape[1], generator=g)}
    for name in (CONV, LINEAR, KEY):
        w = pipe.unet.get_parameter(name.removeprefix("unet."))
        a = torch.randn(2, *w.shape[1:], generator=g)
        b = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g)
        tensors[f"{name}.lora_A"] = a
        tensors[f"{name}.lora_B"] = b * size * float(w.norm()) / float((b.flatten(1) @ a.flatten(1)).norm())
    params = dict(token=token, modules=[CONV, LINEAR, KEY], strength=1.0, method="hand", scope=scope,
                  base_model=base_signature(pipe))
    return Edit("learned_concept", params, tensors, label=f"learn {token} (hand)")


@pytest.fixture(scope="module")
def base(toy):
    return dict(fingerprint=toy.fingerprint())


def image(manager, prompts, seed=1):
    """One image per prompt, generated together in one batch (the pipeline's own list-of-prompts path)."""
    prompts = [prompts] if isinstance(prompts, str) else prompts
    with manager.lock, steering.generation(manager.pipe, steering.Plan(prompts)):
        out = manager.pipe(prompt=prompts, num_inference_steps=6, output_type="np",
                           generator=torch.Generator().manual_seed(seed)).images
    return list(np.round(out * 255).astype(int))


def test_scoped_concept_leaves_other_prompts_bit_identical_and_acts_like_the_merged_one(toy, base):
    pipe = toy.pipe
    plain = image(toy, ["a red circle", "a blue square"])
    toy.apply(lora_concept(pipe, scope="always"))
    merged = image(toy, ["a red circle", "a red <zz>"])
    toy.undo()
    toy.apply(lora_concept(pipe))
    scoped_fp = toy.fingerprint()
    try:
        # one batch mixing a prompt with the token and one without: the gate is per image
        got = image(toy, ["a red circle", "a red <zz>"])
        assert np.abs(merged[0] - plain[0]).max() > 20  # merged, the change leaks into the circle
        assert np.array_equal(got[0], plain[0])  # scoped, it does not (bit for bit)
        assert np.abs(got[1] - merged[1]).max() <= 2  # with the token: the merged concept's image
        assert np.array_equal(image(toy, ["a red circle", "a blue square"])[1], plain[1])
        toy.replace(toy.stack.position, with_strength(toy.stack.entries[-1].edit, 0.5))
        assert toy.fingerprint() not in (scoped_fp, base["fingerprint"])  # the hook's strength is in the state
        half = image(toy, "a red <zz>")[0]
        assert np.abs(half - got[1]).max() > 10
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]
    toy.redo()
    assert np.array_equal(image(toy, "a red <zz>")[0], half)  # redo brings back the hooks at strength 0.5
    toy.undo()
    assert toy.fingerprint() == base["fingerprint"]


def test_scope_is_off_for_unet_calls_outside_a_generation(toy, base):
    """Training and other direct UNet calls after a generation see the base model, not the last prompt's gate."""
    pipe = toy.pipe
    toy.apply(lora_concept(pipe))
    try:
        image(toy, "a <zz>")
        ids = pipe.tokenizer(["a <zz>"], padding="max_length", return_tensors="pt").input_ids
        with torch.no_grad():
            cond = pipe.text_encoder(ids)[0]
            x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
            scoped = pipe.unet(x, 500, cond).sample
            hooks = {n: m._forward_hooks for n, m in pipe.unet.named_modules() if m._forward_hooks}
            assert len(hooks) == 3
            for m in pipe.unet.modules():
                m._forward_hooks = type(m._forward_hooks)()
            try:
                bare = pipe.unet(x, 500, cond).sample
            finally:
                for n, table in hooks.items():
                    pipe.unet.get_submodule(n)._forward_hooks = table
        assert torch.equal(scoped, bare)
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]


def test_the_gate_is_per_image_negative_row_included(toy, base):
    pipe = toy.pipe
    toy.apply(lora_concept(pipe))
    module = pipe.unet.get_submodule(CONV.removeprefix("unet.").removesuffix(".weight"))
    seen = []
    handle = module.register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    try:
        image(toy, ["a red circle", "a <zz>"])
    finally:
        handle.remove()
        toy.undo()
    x, out = seen[0]  # rows: [neg circle, neg zz, circle, zz]
    delta = (out - module._conv_forward(x, module.weight, module.bias)).abs().amax((1, 2, 3))
    assert delta[0] == 0 and delta[2] == 0 and delta[1] > 1e-2 and delta[3] > 1e-2


def test_scope_survives_export_import_and_edit_files(toy, base, tmp_path):
    pipe = toy.pipe
    edit = lora_concept(pipe)
    toy.apply(edit)
    want = image(toy, ["a red <zz>", "a red circle"])
    path = toy.save_edits(tmp_path / "scoped.safetensors")
    toy.undo()
    toy.load_edits(path)
    assert [np.array_equal(a, b) for a, b in zip(image(toy, ["a red <zz>", "a red circle"]), want)] == [True, True]
    toy.reset()
    files = export_concept(edit, tmp_path / "export", ["embedding", "lora"], model=toy)["written"]
    imported = import_concept(files["embedding"] + files["lora"], token="<zz>", pipe=toy)
    assert imported.params["scope"] == "prompt"
    toy.apply(imported)
    try:
        assert [np.array_equal(a, b) for a, b in zip(image(toy, ["a red <zz>", "a red circle"]), want)] == [True, True]
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]


def test_bad_scope_is_refused(toy, base):
    with pytest.raises(StudioError, match="scope"):
        import_concept([], pipe=toy, scope="sometimes")
    assert toy.fingerprint() == base["fingerprint"]
    hook = ScopedChange.__new__(ScopedChange)
    with pytest.raises(StudioError, match="linear and conv"):
        ScopedChange.__init__(hook, None, "unet.x.norm.weight", torch.nn.LayerNorm(4), (torch.ones(4),), 1.0)


def test_scope_can_be_changed_on_an_applied_concept_and_blocks_a_pipeline_export(toy, base, tmp_path):
    from studio.customize.library import set_strength
    from studio.lora_export import export_pipeline

    plain = image(toy, "a red circle")[0]
    toy.apply(lora_concept(toy.pipe))
    try:
        with pytest.raises(StudioError, match="every prompt"):
            export_pipeline(toy, tmp_path / "pipe")
        assert not (tmp_path / "pipe").exists()
        set_strength(toy, 1, scope="always")  # merged into the weights: the circle changes, export works
        assert np.abs(image(toy, "a red circle")[0] - plain).max() > 20
        assert (export_pipeline(toy, tmp_path / "pipe") / "unet").is_dir()
        set_strength(toy, 1, scope="prompt")
        assert np.array_equal(image(toy, "a red circle")[0], plain)
        with pytest.raises(StudioError, match="unknown scope"):
            set_strength(toy, 1, scope="sometimes")
        assert toy.stack.entries[0].edit.params["scope"] == "prompt"
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]


@pytest.mark.parametrize("scope", ["prompt", "always"])
def test_a_change_that_does_not_fit_its_weight_is_refused_and_nothing_changes(toy, base, scope):
    good = lora_concept(toy.pipe, scope=scope)
    tensors = dict(good.tensors)
    tensors[f"{LINEAR}.lora_A"] = tensors[f"{LINEAR}.lora_A"][:, :-1]  # one input column short
    before = len(toy.history())
    with pytest.raises(StudioError, match="does not fit the weight"):
        toy.apply(Edit(good.kind, good.params, tensors, label=good.label))
    assert len(toy.history()) == before and toy.fingerprint() == base["fingerprint"]
