"""Attention capture: equal to the explicit computation, invisible in the outputs, exactly removable."""
import numpy as np
import pytest
import torch

from contextlib import contextmanager

from studio import steering
from studio.attention.run import CaptureOptions, generate_with_maps
from studio.attention.selfattn import components, explicit_matrix, pixel_row
from studio.capture import AttentionSession, CrossAttentionStore, install, new_session
from studio.demo_model import build_demo_pipeline
from studio.errors import StudioError
from studio.generation import GenerationRequest
from studio.tokenizer import prompt_words, token_positions


@contextmanager
def installed(pipe, session):
    """The session's processors on `pipe` inside the block, removed exactly afterwards."""
    with steering.temporary(pipe) as patch:
        install(patch, pipe, session)
        yield session


def explicit_probs(attn, hidden, context):
    """The slow reference: diffusers' explicit attention path, (B, H, N, M)."""
    probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(hidden)), attn.head_to_batch_dim(attn.to_k(context)))
    return probs.view(hidden.shape[0], attn.heads, *probs.shape[1:])


@pytest.fixture(scope="module")
def unet_inputs():
    pipe = build_demo_pipeline()
    torch.manual_seed(0)
    return pipe, torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 77, 128)


def recorded(unet, which):
    """Forward hooks recording each attention module's inputs (for the reference)."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, n=n: inputs.__setitem__(
        n, (args[0], kwargs.get("encoder_hidden_states"))), with_kwargs=True)
        for n, m in unet.named_modules() if n.endswith(which)]
    return inputs, hooks


def test_captured_maps_equal_the_explicit_reference_and_outputs_are_untouched(unet_inputs):
    pipe, x, t, text = unet_inputs
    unet = pipe.unet
    originals = dict(unet.attn_processors)
    plain = unet(x, t, encoder_hidden_states=text).sample
    inputs, hooks = recorded(unet, "attn2")
    # batch = [negative, prompt]: keep both halves, per head, the first 9 tokens, and per-step copies
    session = AttentionSession(CrossAttentionStore(negative=True, heads=True, per_step=True, tokens=9))
    with installed(pipe, session):
        captured = unet(x, t, encoder_hidden_states=text).sample
        session.cross.step_end()
        unet(x, t, encoder_hidden_states=text)
        session.cross.step_end()
    for h in hooks:
        h.remove()

    assert torch.equal(plain, captured)  # SDPA still computes every output
    assert all(unet.attn_processors[n] is p for n, p in originals.items())  # the exact processors are back
    store = session.cross
    assert len(store.sums) == len(inputs) == 7
    for name, (h, ctx) in inputs.items():
        reference = explicit_probs(unet.get_submodule(name), h, ctx)[..., :9]
        key = f"{name}.processor"
        assert store.counts[key] == 2
        torch.testing.assert_close(store.sums[key] / 2, reference, atol=1e-6, rtol=1e-5)
        assert len(store.steps[key]) == 2 and store.steps[key][0].dtype == torch.float16
        torch.testing.assert_close(store.steps[key][1].float(), reference.mean(1), atol=2e-3, rtol=2e-3)


def test_conditional_half_only_by_default_and_the_legacy_maps(unet_inputs):
    pipe, x, t, text = unet_inputs
    inputs, hooks = recorded(pipe.unet, "attn2")
    store = CrossAttentionStore()  # classifier-free-guidance batch: only the conditional half
    with installed(pipe, AttentionSession(store)):
        pipe.unet(x, t, encoder_hidden_states=text)
    for h in hooks:
        h.remove()
    for name, (h, ctx) in inputs.items():
        reference = explicit_probs(pipe.unet.get_submodule(name), h[1:], ctx[1:]).mean(1)
        torch.testing.assert_close(store.sums[f"{name}.processor"], reference, atol=1e-6, rtol=1e-5)
    maps = store.maps(size=8)
    assert maps.shape == (1, 77, 8, 8) and torch.allclose(maps.sum(1), torch.ones(1, 8, 8), atol=1e-4)


def test_self_attention_row_on_demand_equals_the_explicit_matrix(unet_inputs):
    pipe, x, t, text = unet_inputs
    unet = pipe.unet
    inputs, hooks = recorded(unet, "attn1")
    session = new_session(self_steps=(0,))
    session.begin(cfg=True, latent_hw=(16, 16))
    with installed(pipe, session):
        unet(x, t, encoder_hidden_states=text)
    for h in hooks:
        h.remove()
    (_, name), (q, k) = next((key, v) for key, v in session.self_qk.items() if "down_blocks.0" in key[1])
    attn = unet.get_submodule(name.removesuffix(".processor"))
    hidden = inputs[name.removesuffix(".processor")][0][1:]  # the conditional row
    reference = explicit_probs(attn, hidden, hidden)[0]  # (H, 256, 256)
    torch.testing.assert_close(explicit_matrix(q[0], k[0]), reference, atol=1e-6, rtol=1e-5)
    assert q.shape == (1, attn.heads, 256, attn.inner_dim // attn.heads)  # Q and K kept, never N x N


def test_capture_through_the_manager_changes_nothing_and_leaves_no_trace(manager):
    request = GenerationRequest("a red circle and a blue square", seed=5, steps=4)
    f0, processors = manager.fingerprint(), dict(manager.pipe.unet.attn_processors)
    plain = manager.generate(request).images[0]
    result = generate_with_maps(manager, request, CaptureOptions(per_step=True, heads=True))
    after = manager.generate(request).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(result.images[0]))
    assert np.array_equal(np.asarray(plain), np.asarray(after))
    assert all(manager.pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert manager.fingerprint() == f0 and manager.history() == [] and steering.slots(manager.pipe) == []
    # every layer at every step, both kinds of attention, on the CPU
    assert set(result.resolutions()) == {16, 8, 4} and result.heads == 4 and result.branches == ("prompt",)
    assert all(v.shape[0] == 4 and v.device.type == "cpu" for v in result.per_step.values())
    assert list(result.self_qk) == [2]
    row = pixel_row(result, 10, 40)
    assert row.shape == (16, 16) and abs(float(row.sum()) - 1) < 1e-4
    res, comps = components(result, 4)
    assert res == 16 and comps.shape == (4, 16, 16) and float(comps.min()) == 0 and float(comps.max()) == 1


def test_negative_prompt_maps_and_words(manager):
    r = generate_with_maps(manager, GenerationRequest("a red circle", "a green star", seed=1, steps=2),
                           CaptureOptions(per_step=False, self_step=-1))
    assert r.branches == ("negative", "prompt") and r.per_step is None and not r.self_qk
    assert [w.text for w in r.words(branch="negative")] == ["a", "green", "star"]
    tok = manager.pipe.tokenizer
    assert [w.text for w in prompt_words(tok, "a red circle and a box", special=True)] == \
        ["<sos>", "a", "red", "circle", "and", "a (2)", "box", "<eos>"]
    assert token_positions(tok, "a photo of a red circle", "circle") == [6]
    assert token_positions(tok, "a red circle and a box", "a (2)") == [5]
    assert token_positions(tok, "a red circle", "<eos>") == [4]
    assert token_positions(tok, "a red circle", "red circle") == [2, 3]
    with pytest.raises(StudioError, match="'dog' is not a word of the prompt 'a red circle'; its words are: a, red, circle"):
        token_positions(tok, "a red circle", "dog")
