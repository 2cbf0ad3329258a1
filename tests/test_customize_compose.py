"""Composing several concepts: closed-form merge, weighted adapters, region-aware sampling, T2I-Zero.

Concepts are made by hand (a token plus K/V changes as full deltas or LoRA factors, and one change
outside cross-attention), so the tests are fast and know exactly what each concept changes.
"""
import numpy as np
import pytest
import torch

from studio.customize.compose import (
    SteeredAttention,
    adapters_edit,
    correct_by_similarities,
    lora_factors,
    merge_edit,
    nms_bias,
    region_edit,
    t2i_zero_edit,
)
from studio import models, steering
from studio.customize.collage import predicting
from studio.customize.concept import base_signature, with_strength
from studio.customize.scope import only, prompt_scopes
from studio.training import lora
from studio.edits import Edit
from studio.erase.text import encode
from studio.errors import StudioError
from studio.generation import GenerationRequest
from studio.toyworld.presets import toy_reg_prompts
from studio.toyworld.scenes import COLOURS

PROMPT = "a red circle and a blue square"
OUTSIDE = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture(scope="module")
def base(toy):
    """The unedited model's fingerprint and image, made once."""
    return dict(fingerprint=toy.fingerprint(), images={PROMPT: image(toy)})


def image(manager, prompt=PROMPT, seed=0) -> np.ndarray:
    return np.asarray(manager.generate(GenerationRequest(prompt, seed=seed, steps=10)).images[0])


def base_image(toy, base, prompt=PROMPT):
    if prompt not in base["images"]:
        assert toy.fingerprint() == base["fingerprint"]
        base["images"][prompt] = image(toy, prompt)
    return base["images"][prompt]


def assert_undone(toy, base, prompt=PROMPT):
    """The state and the image are exactly those of the unedited model."""
    toy.undo()
    assert toy.fingerprint() == base["fingerprint"]
    assert np.array_equal(image(toy, prompt), base_image(toy, base, prompt))


def concept(pipe, token, seed, kv="delta", outside=False, ti_only=False, scale=0.1, vectors=1) -> Edit:
    """A hand-made learned concept: a token and random K/V changes (full deltas or rank-2 LoRA factors)."""
    g = torch.Generator().manual_seed(seed)
    emb = pipe.text_encoder.get_input_embeddings().weight
    tensors = {"embedding": emb.mean(0) + emb.std() * torch.randn(vectors, emb.shape[1], generator=g)}
    modules = []
    for name, layer in ([] if ti_only else sorted(models.of(pipe).text_projections().items())):
        w = layer.weight
        size = scale * float(w.norm())
        if kv == "delta":
            d = torch.randn(w.shape, generator=g)
            tensors[f"{name}.delta"] = d * size / d.norm()
        else:
            a, b = torch.randn(2, w.shape[1], generator=g), torch.randn(w.shape[0], 2, generator=g)
            tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a, b * size / (b @ a).norm()
        modules.append(name)
    if outside:
        w = pipe.unet.get_parameter(OUTSIDE.removeprefix("unet."))
        tensors[f"{OUTSIDE}.delta"] = 0.05 * w.std() * torch.randn(w.shape, generator=g)
        modules.append(OUTSIDE)
    params = dict(token=token, modules=modules, strength=1.0, method="hand", base_model=base_signature(pipe))
    return Edit("learned_concept", params, tensors, label=f"learn {token} (hand)")


def encoded(pipe, prompt):
    """(prompt, empty negative) embeddings as a generation reads them: after the 'condition' slots."""
    plan, model = steering.Plan([prompt]), models.of(pipe)
    with steering.generation(pipe, plan):
        return steering.condition(pipe, model.encode([prompt]), plan).embeds, model.encode([""]).embeds


def colour_centre_x(img: np.ndarray, colour: str) -> float:
    near = np.abs(img.astype(int) - np.array(COLOURS[colour])).sum(-1) < 90
    assert near.sum() > 30, f"no {colour} object in the image"
    return float(np.nonzero(near)[1].mean())


# -- (c) regions ------------------------------------------------------------------------------------
def test_region_edit_puts_each_object_in_its_box_and_undoes_exactly(toy, base):
    before = base_image(toy, base)
    assert colour_centre_x(before, "red") > colour_centre_x(before, "blue")  # seed 0 draws red on the right
    toy.apply(region_edit([("red circle", (0, 0, 0.5, 1)), ("blue square", (0.5, 0, 1, 1))]))
    after = image(toy)
    assert colour_centre_x(after, "red") < 28 and colour_centre_x(after, "blue") > 36
    assert toy.fingerprint() != base["fingerprint"]
    assert_undone(toy, base)


def test_region_masks_steer_only_the_conditional_rows_and_the_first_steps(toy, base):
    left = np.zeros((40, 40))
    left[:, :20] = 255  # a mask of another size than any attention grid, 0..255
    toy.apply(region_edit([("red circle", left), ("blue square", torch.ones(3, 3))], until=0.5))
    try:
        pipe = toy.pipe
        proc = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor
        assert isinstance(proc, SteeredAttention) and proc.clock
        steer = proc.steerings[0]
        steer.begin_generation(steering.Plan([PROMPT]))
        assert steer.positions == [[[2, 3], [6, 7]]]
        q, k = torch.zeros(1, 2, 64, 4), torch.zeros(1, 2, 77, 4)
        bias = steer.bias(None, q, k, (8, 8)).reshape(8, 8, 77)
        assert (bias[:, :4, 2:4] == 0).all() and (bias[:, 4:, 2:4] < -1e3).all()  # red words: left half only
        assert (bias[..., 6:8] == 0).all() and (bias[..., [0, 1, 4, 5, 8]] == 0).all()
        pipe._num_timesteps = 10
        assert steer.rows(2) == slice(1, None) and steer.rows(1) == slice(None) and steer.rows(3) is None
        for _ in range(5):
            steer.tick(2)
        assert steer.rows(2) is not None  # pass 5 of 10 still steered
        steer.tick(1)  # a guidance pass (conditional rows only) is no denoising step
        steer.tick(2)
        assert steer.rows(2) is None
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]


@pytest.mark.parametrize("regions, until, message", [
    ([], 1.0, "at least one region"),
    ([("red circle", (0.5, 0, 0.2, 1))], 1.0, "0 <= x0 < x1 <= 1"),
    ([("red circle", (0, 0, 1.5, 1))], 1.0, "0 <= x0 < x1 <= 1"),
    ([("", (0, 0, 1, 1))], 1.0, "which words"),
    ([("red", (0, 0, 1, 1)), ("red", (0, 0, 0.5, 1))], 1.0, "two regions"),
    ([("red", np.zeros((8, 8)))], 1.0, "mask is empty"),
    ([("red", np.ones((8, 8, 3)))], 1.0, "2-D"),
    ([("red", "left")], 1.0, "box"),
    ([("red", (0, 0, 1, 1))], 0.0, "fraction of steps"),
    (["red"], 1.0, "pair"),
])
def test_region_edit_refuses_bad_input(regions, until, message):
    with pytest.raises(StudioError, match=message):
        region_edit(regions, until=until)
    with pytest.raises(StudioError, match="collage's share"):
        region_edit([("red", (0, 0, 1, 1))], collage=1.5)


@pytest.mark.parametrize("left, right", [("red circle", "blue square"), ("blue square", "red circle")])
def test_collage_draws_each_regions_words_in_its_region_and_undoes_exactly(toy, base, left, right):
    from studio.toyworld.evaluate import bundled_oracle

    right_half = np.zeros((32, 32))
    right_half[:, 16:] = 1  # a mask region
    toy.apply(region_edit([(left, (0, 0, 0.5, 1)), (right, right_half)], collage=0.2))
    images = [np.asarray(im) for im in toy.generate(GenerationRequest(PROMPT, seed=0, batch=2, steps=10)).images]
    for im in images:
        x = {w.split()[0]: colour_centre_x(im, w.split()[0]) for w in (left, right)}
        assert x[left.split()[0]] < 28 and x[right.split()[0]] > 36
        assert {"circle", "square"} <= {r.shape for r in bundled_oracle().read(im)}
    assert_undone(toy, base)


def test_a_stop_while_the_regions_are_drawn_ends_the_job_and_leaves_the_model(toy, base):
    from studio.errors import JobStopped

    toy.apply(region_edit([("red circle", (0, 0, 0.5, 1)), ("blue square", (0.5, 0, 1, 1))], collage=0.2))
    seen = []

    def progress(done, total):
        seen.append(done)
        toy.request_stop()

    with pytest.raises(JobStopped):
        toy.generate(GenerationRequest(PROMPT, steps=4), progress)
    assert seen == [1]  # at the first region's first step
    assert_undone(toy, base)


def test_a_region_pass_keeps_only_the_concepts_its_words_name(toy, base):
    pipe = toy.pipe
    for i, token in enumerate(("<aa>", "<bb>")):
        c = concept(pipe, token, i + 1, kv="lora", scale=0.3)
        toy.apply(Edit(c.kind, {**c.params, "scope": "prompt"}, c.tensors, label=c.label))
    scopes = prompt_scopes(pipe)
    assert [s.words for s in scopes] == [["<aa>"], ["<bb>"]]
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor(500)
    with torch.no_grad(), steering.generation(pipe, steering.Plan(["a <aa> and a <bb>"])):
        context = torch.cat(pipe.encode_prompt("a <aa> and a <bb>", "cpu", 1, True)[::-1])  # both named
        run = lambda: pipe.unet(x, t, context).sample  # noqa: E731
        both = run()
        with only(scopes, [scopes[0]]):
            first = run()
        with only(scopes, []):
            neither = run()
        assert not torch.equal(first, both) and not torch.equal(first, neither)
        assert scopes[1].gate(2).all()  # named again after the block
        toy.undo()
        assert torch.equal(run(), first)  # only <aa> applied: exactly the pass that kept <aa>
        toy.undo()
        assert torch.equal(run(), neither)
    assert toy.fingerprint() == base["fingerprint"]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_held_steps_predict_exactly_the_collage(kind):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g), torch.tensor([700])
    out = predicting(scheduler, scheduler.add_noise(x0, noise, t), t, x0)
    want = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[kind]
    assert torch.allclose(out, want, atol=1e-4)


# -- (a) closed-form merge --------------------------------------------------------------------------
def test_merge_keeps_each_concepts_outputs_on_its_tokens_and_ordinary_captions_nearly_unchanged(toy, base):
    pipe = toy.pipe
    a = concept(pipe, "<aa>", 1, kv="delta")
    b = concept(pipe, "<bb>", 2, kv="lora", outside=True)
    c = concept(pipe, "<cc>", 3, ti_only=True)
    edit = merge_edit(pipe, [a, b, c], toy_reg_prompts())
    assert edit.kind == "compose_merge" and edit.params["reg_prompts"] == 200
    assert max(edit.params["constraint_error"].values()) < 1e-3
    assert edit.params["reg_change"] < 0.5 * edit.params["reg_change_if_summed"]
    notes = " ".join(edit.params["notes"])
    assert "summed" in notes and "<cc>" in notes
    kv = sorted(models.of(pipe).text_projections())
    w0 = {n: pipe.unet.get_parameter(n.removeprefix("unet.")).detach().clone() for n in kv + [OUTSIDE]}
    # the token's feature depends only on what comes before it (CLIP is causal): these are templates' features
    prompts = {t: [f"a photo of {t}", f"a {t} and a red circle", f"{t} on the left"] for t in ("<aa>", "<bb>", "<cc>")}
    other = [p for p in toy_reg_prompts(230)[200:]]  # captions the merge did not see

    toy.apply(edit)
    try:
        feats = {}
        for t, ps in prompts.items():
            tid = pipe.tokenizer.convert_tokens_to_ids(t)
            ids = pipe.tokenizer(ps, padding="max_length", max_length=77, return_tensors="pt").input_ids
            feats[t] = encode(pipe, ps)[ids == tid]  # the token's features in prompts of its own
        plain = encode(pipe, other)[:, 1:].reshape(-1, 128)
        for name in kv:
            w = pipe.unet.get_parameter(name.removeprefix("unet.")).detach()
            for t, e in (("<aa>", a), ("<bb>", b), ("<cc>", c)):
                own = w0[name] + (0 if name not in e.params["modules"] else
                                  (e.tensors[f"{name}.delta"] if f"{name}.delta" in e.tensors else
                                   e.tensors[f"{name}.lora_B"] @ e.tensors[f"{name}.lora_A"]))
                want, got = feats[t] @ own.T, feats[t] @ w.T
                assert (got - want).norm() <= 1e-3 * want.norm(), (name, t)
            merged_change = (plain @ (w - w0[name]).T).norm() / (plain @ w0[name].T).norm()
            summed = a.tensors[f"{name}.delta"] + b.tensors[f"{name}.lora_B"] @ b.tensors[f"{name}.lora_A"]
            assert merged_change < 0.5 * (plain @ summed.T).norm() / (plain @ w0[name].T).norm()
        w = pipe.unet.get_parameter(OUTSIDE.removeprefix("unet."))
        assert torch.allclose(w, w0[OUTSIDE] + b.tensors[f"{OUTSIDE}.delta"], atol=1e-6)  # summed, as noted
        image(toy, "a <aa> and a <bb> and a <cc>")  # the tokens are all usable at once
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]
    assert "<aa>" not in pipe.tokenizer.get_vocab()


def test_merge_refuses_what_it_cannot_compose(toy, base):
    pipe = toy.pipe
    a, b = concept(pipe, "<aa>", 1), concept(pipe, "<bb>", 2)
    with pytest.raises(StudioError, match="at least 2"):
        merge_edit(pipe, [a])
    with pytest.raises(StudioError, match="two concepts use the token"):
        merge_edit(pipe, [a, concept(pipe, "<aa>", 3)])
    with pytest.raises(StudioError, match="not a learned concept"):
        merge_edit(pipe, [a, region_edit([("red", (0, 0, 1, 1))])])
    foreign = Edit("learned_concept", {**b.params, "base_model": "0123456789abcdef"}, b.tensors)
    with pytest.raises(StudioError, match="another model"):
        merge_edit(pipe, [a, foreign])
    tokenless = Edit("learned_concept", {**b.params, "token": None}, b.tensors)
    with pytest.raises(StudioError, match="no token"):
        merge_edit(pipe, [a, tokenless])
    assert toy.fingerprint() == base["fingerprint"]


# -- (b) weighted adapters --------------------------------------------------------------------------
def test_full_deltas_become_exact_full_rank_factors():
    g = torch.Generator().manual_seed(0)
    for shape in ((64, 128), (32, 16, 3, 3)):
        delta = torch.randn(shape, generator=g)
        a, b = lora_factors({"w.delta": delta}, "w")
        assert torch.allclose((b.flatten(1) @ a.flatten(1)).reshape(shape), delta, atol=1e-5)


def test_adapters_at_weight_zero_are_the_base_model_and_at_one_the_fused_concepts(toy, base):
    pipe = toy.pipe
    a = concept(pipe, "<aa>", 1, kv="delta", scale=0.3)
    b = concept(pipe, "<bb>", 2, kv="lora", outside=True, scale=0.3)
    with pytest.raises(StudioError, match="one weight per concept"):
        adapters_edit([a, b], [1.0])
    with pytest.raises(StudioError, match="weight"):
        adapters_edit([a, b], [1.0, float("nan")])
    with pytest.raises(StudioError, match="not a learned concept"):
        adapters_edit([a, "b"], [1, 1])
    to_k = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
    both = "a <aa> red circle and a <bb> blue square"

    toy.apply(adapters_edit([a, b], [0.0, 0.0]))
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer

        layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k
        assert isinstance(layer, BaseTunerLayer) and layer.base_layer is to_k
        assert sorted(layer.active_adapters) == ["concept_0", "concept_1"]
        with pytest.raises(StudioError, match="unfused adapters"):
            with lora(pipe.unet, 4, "attention"):  # training is refused while adapters ride on the UNet
                pass
        assert np.array_equal(image(toy), base_image(toy, base))
        tokens_only = image(toy, both)
    finally:
        toy.undo()
    assert pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k is to_k
    assert toy.fingerprint() == base["fingerprint"]

    toy.apply(a)
    toy.apply(b)
    fused = image(toy, both)
    toy.undo()
    toy.undo()
    toy.apply(adapters_edit([a, with_strength(b, 0.5)], [1.0, 2.0]))  # weight x strength = 1
    unfused = image(toy, both)
    assert np.abs(fused.astype(int) - tokens_only.astype(int)).max() > 30  # the concepts' weights matter
    assert np.abs(unfused.astype(int) - fused.astype(int)).max() <= 3
    assert_undone(toy, base)


# -- (d) T2I-Zero -----------------------------------------------------------------------------------
def test_correction_by_similarities_mixes_only_concept_tokens():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(1, 77, 16, generator=g)
    assert torch.equal(correct_by_similarities(emb, [[2, 5]], [8], top_k=1), emb)  # its own best match: itself
    out = correct_by_similarities(emb, [[2, 5]], [8], top_k=6, temperature=1e3)  # flat weights: the mean
    assert torch.allclose(out[0, 2], emb[0, 1:7].mean(0), atol=1e-3)
    keep = [i for i in range(77) if i not in (2, 5)]
    assert torch.equal(out[0, keep], emb[0, keep])


def test_cross_token_nms_keeps_one_concept_per_pixel():
    probs = torch.full((1, 16, 6), 0.01)
    probs[0, :8, 2] = 0.5  # word 1 (position 2) wins the top half
    probs[0, 8:, 3] = 0.4  # word 2 (positions 3, 4) the bottom half
    probs[0, 8:, 4] = 0.4
    bias = nms_bias(probs, [[[2], [3, 4]]], (4, 4), smooth=(1, 0.5))
    assert (bias[0, :8, 2] == 0).all() and (bias[0, :8, 3:5] < -1e3).all()
    assert (bias[0, 8:, 3:5] == 0).all() and (bias[0, 8:, 2] < -1e3).all()
    assert (bias[..., [0, 1, 5]] == 0).all()
    soft = nms_bias(probs, [[[2], [3, 4]]], (4, 4), suppress=0.5)
    assert torch.allclose(soft[0, 8:, 2], torch.tensor(np.log(0.5), dtype=torch.float32))
    assert (nms_bias(probs, [[[2], []]], (4, 4)) == 0).all()  # one concept present: nothing to suppress


def test_t2i_zero_changes_only_the_concept_embeddings_and_stacks_with_regions(toy, base):
    pipe = toy.pipe
    cond0, neg0 = encoded(pipe, PROMPT)
    toy.apply(t2i_zero_edit(["circle", "square"]))
    try:
        cond, neg = encoded(pipe, PROMPT)
        assert torch.equal(neg, neg0)
        changed = [i for i in range(77) if not torch.equal(cond[0, i], cond0[0, i])]
        assert changed == [3, 7]
        assert not np.array_equal(image(toy), base_image(toy, base))
        toy.apply(region_edit([("red circle", (0, 0, 0.5, 1)), ("blue square", (0.5, 0, 1, 1))]))
        proc = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.processor
        assert len(proc.steerings) == 2
        image(toy)
        toy.undo()
    finally:
        toy.undo()
    assert toy.fingerprint() == base["fingerprint"]
    assert torch.equal(encoded(pipe, PROMPT)[0], cond0)


@pytest.mark.parametrize("words, options, message", [
    (["circle"], {}, "at least two"),
    (["circle", "circle"], {}, "once"),
    (["circle", ""], {}, "at least two"),
    (["circle", "square"], {"top_k": 0}, "top_k"),
    (["circle", "square"], {"temperature": 0}, "temperature"),
    (["circle", "square"], {"smooth": [2, 0.5]}, "odd kernel"),
    (["circle", "square"], {"correction": False, "nms": False}, "turn on"),
    (["circle", "square"], {"sharpness": 3}, "unknown"),
])
def test_t2i_zero_refuses_bad_settings(words, options, message):
    with pytest.raises(StudioError, match=message):
        t2i_zero_edit(words, **options)


def test_compositions_survive_an_edit_file(toy, base, tmp_path):
    pipe = toy.pipe
    toy.apply(merge_edit(pipe, [concept(pipe, "<aa>", 1), concept(pipe, "<bb>", 2, kv="lora", vectors=2)],
                         toy_reg_prompts()))
    toy.apply(region_edit([("<aa>", np.eye(8)), ("<bb>", (0.5, 0, 1, 1))]))
    toy.apply(t2i_zero_edit(["<aa>", "<bb>"]))
    toy.apply(region_edit([("<aa>", (0, 0, 0.5, 1)), ("<bb>", (0.5, 0, 1, 1))], collage=0.2))
    state = toy.fingerprint()
    # learned tokens are found, "<bb>" as its 2 vectors
    with steering.generation(pipe, steering.Plan(["a <aa> and a <bb>"])):
        steerings = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.processor.steerings
        assert [s.positions for s in steerings] == [[[[2], [5, 6]]]] * 2
    path = toy.save_edits(tmp_path / "compose.safetensors")
    toy.reset()
    assert toy.fingerprint() == base["fingerprint"]
    toy.load_edits(path)
    assert toy.fingerprint() == state
    toy.reset()
    assert toy.fingerprint() == base["fingerprint"]
