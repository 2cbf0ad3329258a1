"""Cross-attention capture: equal to the explicit computation, invisible in the outputs, removable."""
import torch

from studio.attention.capture import CrossAttentionStore, capture_cross_attention, token_positions
from studio.demo_model import build_demo_pipeline


def test_captured_maps_equal_the_explicit_reference_and_outputs_are_untouched():
    pipe = build_demo_pipeline()
    unet = pipe.unet
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([500, 500]), torch.randn(2, 77, 128)
    originals = dict(unet.attn_processors)
    plain = unet(x, t, encoder_hidden_states=text).sample

    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out, n=n: inputs.__setitem__(n, (args[0], kwargs["encoder_hidden_states"])),
                                     with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith("attn2")]
    store = CrossAttentionStore(cfg_batches=False)
    with capture_cross_attention(unet, store):
        captured = unet(x, t, encoder_hidden_states=text).sample
    for h in hooks:
        h.remove()

    assert torch.equal(plain, captured)  # SDPA still computes every output
    assert all(unet.attn_processors[n] is p for n, p in originals.items())  # exact processors back
    assert len(store.sums) == len(inputs) == 7
    for name, (h, ctx) in inputs.items():
        attn = unet.get_submodule(name)
        probs = attn.get_attention_scores(attn.head_to_batch_dim(attn.to_q(h)), attn.head_to_batch_dim(attn.to_k(ctx)))
        reference = probs.view(2, attn.heads, *probs.shape[1:]).mean(1)
        torch.testing.assert_close(store.sums[f"{name}.processor"], reference, atol=1e-6, rtol=1e-5)


def test_conditional_half_and_word_positions():
    store = CrossAttentionStore(cfg_batches=True)
    probs = torch.zeros(4, 2, 16, 77)
    probs[2:, :, :, 5] = 1.0  # the conditional half attends to token 5
    store.add("layer", probs)
    store.add("layer", probs)
    maps = store.maps(size=8)
    assert maps.shape == (2, 77, 8, 8) and torch.allclose(maps[:, 5], torch.ones(2, 8, 8)) and maps[:, 4].abs().max() == 0
    tok = build_demo_pipeline().tokenizer
    assert token_positions(tok, "a photo of a red circle", "circle") == [6]
    azure = token_positions(tok, "an azure triangle", "azure")
    assert azure[0] == 2 and len(azure) == len(tok("azure", add_special_tokens=False).input_ids)
