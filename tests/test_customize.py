"""Customization: the learned-concept edit (exact undo, strength, toggle), training, images, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from studio.customize.concept import with_strength
from studio.customize.images import load_images
from studio.customize.library import learned_concepts, set_strength
from studio.customize.train import train_concept
from studio.edits import Edit
from studio.errors import JobStopped, StudioError
from studio.generation import GenerationRequest
from studio.toyworld.evaluate import bundled_oracle
from studio.toyworld.presets import toy_examples

KV = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"


def image(manager, prompt, steps=8):
    return np.asarray(manager.generate(GenerationRequest(prompt, seed=0, steps=steps)).images[0])


def hand_made(manager, token="<x>", scale=0.05):
    """A learned concept without training: a random embedding and a random K change."""
    g = torch.Generator().manual_seed(0)
    d = manager.pipe.text_encoder.get_input_embeddings().embedding_dim
    w = manager.pipe.unet.get_parameter(KV.removeprefix("unet."))
    return Edit("learned_concept", {"token": token, "method": "hand", "strength": 1.0, "modules": [KV]},
                {"embedding": torch.randn(1, d, generator=g), f"{KV}.delta": scale * torch.randn(w.shape, generator=g)})


def toy_images(manager, shape="heart", count=8):
    examples = toy_examples(shape, count)
    images, _ = load_images([Image.fromarray(im) for im, _ in examples], 64, [c for _, c in examples])
    return images


def test_concept_edit_installs_token_and_undoes_exactly(manager):
    original, tokenizer = manager.fingerprint(), manager.pipe.tokenizer
    base = image(manager, "a <x>")
    manager.apply(hand_made(manager))
    assert "<x>" in manager.pipe.tokenizer.get_vocab() and manager.pipe.tokenizer is not tokenizer
    assert len(manager.pipe.tokenizer("a <x>").input_ids) == 4  # bos, a, <x>, eos: one token now
    learned = image(manager, "a <x>")
    assert not np.array_equal(learned, base)
    manager.undo()
    assert manager.fingerprint() == original and manager.pipe.tokenizer is tokenizer
    assert np.array_equal(image(manager, "a <x>"), base)
    manager.redo()
    assert np.array_equal(image(manager, "a <x>"), learned)


def test_strength_and_toggle_rewrite_history_exactly(manager):
    original = manager.fingerprint()
    manager.apply(hand_made(manager))
    manager.apply(hand_made(manager, "<y>"))
    both = manager.fingerprint()
    set_strength(manager, 1, 0.0)
    assert [c.strength for c in learned_concepts(manager)] == [0.0, 1.0]
    assert manager.fingerprint() != both
    set_strength(manager, 1, 1.0)
    assert manager.fingerprint() == both  # the same edits at the same strength: bit-identical
    manager.toggle(2)
    assert [c.on for c in learned_concepts(manager)] == [True, False]
    assert "<y>" not in manager.pipe.tokenizer.get_vocab()
    manager.toggle(2)
    assert manager.fingerprint() == both
    manager.reset()
    assert manager.fingerprint() == original


def test_token_checks(manager):
    with pytest.raises(StudioError, match="already a word"):
        manager.apply(hand_made(manager, "red"))
    with pytest.raises(StudioError, match="needs a token"):
        manager.apply(hand_made(manager, " "))
    manager.apply(hand_made(manager))
    with pytest.raises(StudioError, match="already in the vocabulary"):
        manager.apply(hand_made(manager))
    with pytest.raises(StudioError, match="strength"):
        with_strength(hand_made(manager), float("nan"))
    bad = hand_made(manager, "<z>")
    bad.tensors["embedding"] = torch.zeros(1, 7)
    before = manager.fingerprint()
    with pytest.raises(StudioError, match="another model"):
        manager.apply(bad)
    assert manager.fingerprint() == before and len(manager.history()) == 1


def test_images_bad_input(tmp_path):
    with pytest.raises(StudioError, match="at least 3"):
        load_images([Image.new("RGB", (64, 64))], 64)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(StudioError, match="not an image"):
        load_images([tmp_path / "notes.png"] * 3, 64)
    with pytest.raises(StudioError, match="no such file"):
        load_images([tmp_path / "missing.png"] * 3, 64)
    for i, size in enumerate([(16, 16), (64, 48), (1024, 1024)]):
        Image.new("RGB", size, (200, 0, 0)).save(tmp_path / f"{i}.png")
    (tmp_path / "1.txt").write_text("a red {}")
    images, notes = load_images([tmp_path / f"{i}.png" for i in range(3)] + [tmp_path / "1.txt"], 64)
    assert [im.caption for im in images] == [None, "a red {}", None]
    assert all(im.tensor.shape == (3, 64, 64) for im in images)
    assert any("upscaled" in n for n in notes) and any("centre-cropped" in n for n in notes) \
        and any("downscaled" in n for n in notes)
    assert float(images[0].tensor[0].mean()) == pytest.approx(200 / 127.5 - 1, abs=1e-3)


def test_lora_training_teaches_a_held_out_shape(manager):
    """The bar in miniature: 8 generator hearts, LoRA + token, 250 steps; the oracle sees hearts in the
    asked colours. Training leaves the model untouched until the edit is applied."""
    original = manager.fingerprint()
    oracle = bundled_oracle()

    def readings(prompt):
        return [oracle.read(im) for im in
                manager.generate(GenerationRequest(prompt, seed=0, batch=4, steps=20)).images]

    edit = train_concept(manager, toy_images(manager), "<heart>", method="lora", steps=250, seed=0)
    assert manager.fingerprint() == original and "<heart>" not in manager.pipe.tokenizer.get_vocab()
    manager.apply(edit)
    red = readings("a red <heart>")
    hearts = sum(any(r.shape == "heart" for r in rs) for rs in red)
    reds = sum(any(r.colour == "red" for r in rs) for rs in red)
    assert hearts >= 3 and reds >= 3, (hearts, reds)
    assert sum(any(r.shape == "star" for r in rs) for rs in readings("a blue star")) >= 3  # others unharmed
    manager.undo()
    assert manager.fingerprint() == original


@pytest.mark.parametrize("method", ["ti", "custom_diffusion"])
def test_other_methods_train_their_parts(manager, method):
    edit = train_concept(manager, toy_images(manager, count=3), "<c>", method=method, steps=3, batch=2)
    assert set(edit.tensors) >= {"embedding"}
    if method == "ti":
        assert edit.params["modules"] == []
    else:
        assert edit.params["modules"] and all(".attn2.to_k." in m or ".attn2.to_v." in m for m in edit.params["modules"])
        assert any(edit.tensors[f"{m}.delta"].abs().max() > 0 for m in edit.params["modules"])
    manager.apply(edit)
    assert "<c>" in manager.pipe.tokenizer.get_vocab()


def test_training_is_reproducible_from_its_seed(manager):
    """Same seed, same concept, whatever the global generator did before (peft's adapter init draws from it)."""
    images = toy_images(manager, count=3)

    def trained(global_seed, seed=0):
        torch.manual_seed(global_seed)
        return train_concept(manager, images, "<s>", method="lora", steps=2, batch=1, seed=seed).tensors

    a, b, c = trained(1), trained(2), trained(1, seed=1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_stop_saves_state_and_resume_continues(manager, tmp_path):
    original, images = manager.fingerprint(), toy_images(manager, count=3)
    calls = []

    def stop_at_4(done, total):
        calls.append(done)
        if done == 4:
            manager.request_stop()

    with pytest.raises(JobStopped):
        train_concept(manager, images, "<r>", method="lora", steps=10, batch=2, progress=stop_at_4,
                      save_dir=tmp_path, save_every=2)
    assert manager.fingerprint() == original and (tmp_path / "state.safetensors").is_file()
    resumed = []
    edit = train_concept(manager, images, "<r>", method="lora", steps=10, batch=2, save_dir=tmp_path, resume=True,
                         progress=lambda d, t: resumed.append(d))
    assert edit.params["resumed_from"] == 4 and resumed[0] == 5 and resumed[-1] == 10
    with pytest.raises(StudioError, match="other settings"):
        train_concept(manager, images, "<r>", method="lora", steps=10, batch=2, rank=8, save_dir=tmp_path,
                      resume=True)
    with pytest.raises(StudioError, match="class word"):
        train_concept(manager, images, "<r>", semantic_weight=0.1)


def test_compose_switches_the_concepts_off_and_back_on_when_it_fails(manager):
    from studio.customize.library import compose

    manager.apply(hand_made(manager))
    manager.apply(hand_made(manager, "<y>", scale=0.02))
    both = manager.fingerprint()
    with pytest.raises(StudioError, match="weight"):
        compose(manager, [1, 2], "adapters", [1.0, 2.0, 3.0])
    assert manager.fingerprint() == both and [c.on for c in learned_concepts(manager)] == [True, True]
    entry = compose(manager, [1, 2], "merge")
    assert entry.edit.kind == "compose_merge" and [c.on for c in learned_concepts(manager)] == [False, False]
    vocab = manager.pipe.tokenizer.get_vocab()
    assert "<x>" in vocab and "<y>" in vocab
    with pytest.raises(StudioError, match="at least two"):
        compose(manager, [1], "merge")


def test_cut_mix_composites_put_the_concept_beside_a_prior_picture(manager):
    import torch.nn.functional as F

    from studio.customize.train import composites

    pipe = manager.pipe
    images = toy_images(manager, count=3)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # the frozen model's prior picture
    with torch.no_grad():
        partner = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    small = F.interpolate(partner, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)[0]
    pixels, texts = composites(pipe, images, latents, ["a blue square"], 24, torch.Generator().manual_seed(0))
    assert pixels.shape == (24, 3, 64, 64)
    assert {t.replace("a blue square", "P") for t in texts} == {"a red {} and P", "P and a red {}",
                                                               "a green {} and P", "P and a green {}",
                                                               "a blue {} and P", "P and a blue {}"}
    for picture, text in zip(pixels, texts):
        k = 0 if text.startswith("a blue square") else 1  # the caption's order is the pictures' order
        slots = [picture[:, 32 * k:32 * k + 32, 16:48], picture[:, 16:48, 32 * k:32 * k + 32]]  # above / beside
        assert any(torch.allclose(slot, small, atol=1e-5) for slot in slots)
        concept_slots = [picture[:, 32 * (1 - k):32 * (2 - k), 16:48], picture[:, 16:48, 32 * (1 - k):32 * (2 - k)]]
        assert not any(torch.allclose(slot, small, atol=1e-2) for slot in concept_slots)
    with pytest.raises(StudioError, match="Cut-Mix need"):
        train_concept(manager, images, "<cm>", cut_mix=0.5, steps=2)
