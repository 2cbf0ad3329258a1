"""Break-A-Scene extraction: isolated pictures, the attention loss, the edit, bad input."""
import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio import steering
from studio.extract.break_a_scene import AttentionMaps, attention_loss, extract_concepts, isolated, mask_tensor
from studio.extract.evaluate import classify
from studio.images import to_tensor
from studio.toyworld.scenes import make_scene
from studio.training import TrainingImage

SCENE = make_scene(11, n_objects=2, held_out=True)  # a red heart (left) and an outlined yellow triangle
MASKS = [o.mask for o in SCENE.objects]


def picture():
    return TrainingImage(to_tensor(Image.fromarray(SCENE.image)))


def test_isolated_paints_the_other_objects_over_with_the_background():
    keep_heart = isolated(picture(), MASKS, (0,)).tensor
    original = picture().tensor
    heart, triangle = (torch.as_tensor(m) for m in MASKS)
    assert torch.equal(keep_heart[:, heart], original[:, heart])
    background = original[:, ~(heart | triangle)].median(dim=1).values
    assert torch.allclose(keep_heart[:, triangle], background[:, None].expand(-1, int(triangle.sum())))
    assert torch.equal(isolated(picture(), MASKS, (0, 1)).tensor, original)


def test_attention_loss_pulls_a_map_toward_its_mask():
    """Descending the loss moves a token's attention inside its mask (and the other token's into its own)."""
    logits = torch.zeros(1, 256, 77, requires_grad=True)
    masks = [mask_tensor(m, 16) for m in MASKS]
    opt = torch.optim.Adam([logits], lr=0.05)
    positions = [[torch.tensor([2]), torch.tensor([5])]]

    def share(j):
        m = logits.detach().softmax(-1)[0, :, positions[0][j]].mean(-1).reshape(16, 16)
        return float((m * masks[j]).sum() / m.sum())

    before = [share(0), share(1)]
    for _ in range(50):
        loss = attention_loss(logits.softmax(-1), positions, [masks])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [share(0), share(1)]
    assert all(a > b + 0.3 for a, b in zip(after, before)), (before, after)


def test_attention_maps_keep_gradients_to_the_text(manager):
    pipe = manager.pipe
    with steering.temporary(pipe) as patch:
        maps = AttentionMaps.install(patch, pipe, 16)
        context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, requires_grad=True)
        pipe.unet(torch.randn(2, 4, 16, 16), torch.tensor([300, 300]), encoder_hidden_states=context)
    assert maps.maps and all(m.shape == (2, 256, 77) for m in maps.maps)
    torch.stack(maps.maps).mean(0)[:, :, 3].sum().backward()
    assert context.grad[:, 3].abs().sum() > 0


def test_extraction_is_one_edit_with_every_token_and_undoes_exactly(manager):
    original, ticks = manager.fingerprint(), []
    edit = extract_concepts(manager, picture(), MASKS, ["<a>", "<b>"], steps_tokens=3, steps_joint=3, batch=2,
                            isolate=True, progress=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (6, 6) and manager.fingerprint() == original
    assert edit.params["token"] == "<a>" and edit.params["more_tokens"] == ["<b>"] and edit.params["modules"]
    manager.apply(edit)
    vocab = manager.pipe.tokenizer.get_vocab()
    assert "<a>" in vocab and "<b>" in vocab
    manager.undo()
    assert manager.fingerprint() == original and "<a>" not in manager.pipe.tokenizer.get_vocab()


@pytest.mark.parametrize("masks,tokens,kw,message", [
    (MASKS, ["<a>"], {}, "name one token per mask"),
    (MASKS, ["<a>", "<a>"], {}, "same token"),
    (MASKS, ["<a>", "red"], {}, "already a word"),
    (MASKS, ["<a>", "<b>"], dict(steps_tokens=0, steps_joint=0), "no training steps"),
    ([np.zeros((4, 4, 3))] * 2, ["<a>", "<b>"], {}, "2-D"),
])
def test_bad_input(manager, masks, tokens, kw, message):
    with pytest.raises(StudioError, match=message):
        extract_concepts(manager, picture(), masks, tokens, **kw)


def test_classify_picks_the_best_matching_concept():
    class R:
        def __init__(self, shape, colour):
            self.shape, self.colour = shape, colour
    concepts = [("heart", "red"), ("triangle", "yellow")]
    assert classify([R("heart", "orange")], concepts) == 0
    assert classify([R("triangle", "yellow"), R("circle", "red")], concepts) == 1
    assert classify([R("circle", "blue")], concepts) is None
    assert classify([], concepts) is None
