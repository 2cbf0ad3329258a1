"""Segment Anything: a tiny randomly initialised Sam (no checkpoint), clicks -> image pixels, loading."""
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio.extract.sam import (PRESETS, SAM_VIT_B, SAM_VIT_B_URL, SamMasks, build_sam, config_of, display_to_image,
                                image_to_display, infer_config, read_checkpoint)

torch.set_num_threads(1)


def tiny_sam():
    """Sam with a 2-block ViT on 64x64 inputs (4x4 patches of 16), 32-wide prompts: built in milliseconds."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    dim = 32
    return Sam(
        image_encoder=ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, out_chans=dim,
                                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                                      global_attn_indexes=(1,), window_size=2),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(4, 4), input_image_size=(64, 64),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=dim, mlp_dim=64, num_heads=8),
                                 transformer_dim=dim, iou_head_depth=2, iou_head_hidden_dim=16),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


@pytest.fixture
def sam():
    return SamMasks(tiny_sam(), device="cpu")


IMAGE = np.random.default_rng(0).integers(0, 255, (48, 80, 3)).astype(np.uint8)   # 80 wide, 48 high


def spy_predict(sam):
    """Record what SamPredictor.predict receives (and what its prompt encoder then sees)."""
    calls, seen = [], []
    real = sam.predictor.predict

    def predict(**kw):
        calls.append(kw)
        return real(**kw)

    sam.predictor.predict = predict
    encoder = sam.sam.prompt_encoder
    real_forward = encoder.forward

    def forward(points=None, boxes=None, masks=None):
        seen.append((None if points is None else points[0].clone(), None if boxes is None else boxes.clone()))
        return real_forward(points=points, boxes=boxes, masks=masks)

    encoder.forward = forward
    return calls, seen


# -- coordinates -----------------------------------------------------------------------------------------
def test_display_pixels_map_to_the_centre_of_the_image_pixels_they_cover():
    # displayed at half size: display pixel 0 covers image pixels 0..1, whose centre is 0.5
    np.testing.assert_allclose(display_to_image([(0, 0), (39, 23), (10, 5)], (40, 24), (80, 48)),
                               [(0.5, 0.5), (78.5, 46.5), (20.5, 10.5)])
    np.testing.assert_allclose(display_to_image([(3, 7)], (80, 48), (80, 48)), [(3, 7)])   # same size: identity
    pts = np.array([(12.0, 30.0), (150.0, 60.0)])      # shown enlarged 2.5x: the inverse maps back
    np.testing.assert_allclose(image_to_display(display_to_image(pts, (200, 120), (80, 48)), (200, 120), (80, 48)),
                               pts, atol=1e-9)
    np.testing.assert_allclose(display_to_image([(199, 119)], (200, 120), (80, 48)), [(79, 47)])  # kept inside
    with pytest.raises(StudioError, match="outside the 40x24 displayed image"):
        display_to_image([(45, 3)], (40, 24), (80, 48))


def test_a_display_click_reaches_sam_predictor_as_image_pixels(sam):
    calls, seen = spy_predict(sam)
    mask = sam.masks_from_clicks(IMAGE, [(10, 5)], [1], display_size=(40, 24))   # shown at half size
    assert mask.shape == (48, 80) and mask.dtype == bool
    np.testing.assert_allclose(calls[-1]["point_coords"], [(20.5, 10.5)])
    np.testing.assert_array_equal(calls[-1]["point_labels"], [1])
    assert calls[-1]["multimask_output"] is True           # one click: three proposals, the best kept
    # SamPredictor resizes the 80x48 image to the encoder's long side, 64x38, and scales the click with it
    torch.testing.assert_close(seen[-1][0], torch.tensor([[[20.5 * 64 / 80, 10.5 * 38 / 48]]]))
    # image coordinates (no display size) pass unchanged; a box goes through the same mapping
    sam.masks_from_clicks(IMAGE, [(70, 40), (5, 5)], [1, 0])
    np.testing.assert_allclose(calls[-1]["point_coords"], [(70, 40), (5, 5)])
    assert calls[-1]["multimask_output"] is False
    sam.masks_from_clicks(IMAGE, boxes=(2, 3, 20, 11), display_size=(40, 24))
    np.testing.assert_allclose(calls[-1]["box"], [4.5, 6.5, 40.5, 22.5])
    assert calls[-1]["point_coords"] is None


def test_the_best_of_the_proposed_masks_is_kept(sam):
    proposals = np.zeros((3, 48, 80), bool)
    proposals[0, :10], proposals[1, 20:], proposals[2, :, :5] = True, True, True
    sam.predictor.predict = lambda **kw: (proposals, np.array([0.2, 0.9, 0.5]), None)
    sam._image_key = "pretend"
    assert np.array_equal(sam.masks_from_clicks(IMAGE, [(1, 1)]), proposals[1])


def test_image_embedding_is_computed_once_per_image(sam):
    calls = []
    real = sam.predictor.set_image
    sam.predictor.set_image = lambda image, image_format="RGB": (calls.append(image.shape), real(image, image_format))
    sam.masks_from_clicks(IMAGE, [(1, 1)])
    sam.masks_from_clicks(IMAGE, [(30, 20)])
    sam.masks_from_clicks(IMAGE[::-1].copy(), [(30, 20)])
    assert calls == [(48, 80, 3), (48, 80, 3)]


def test_uploads_with_alpha_and_odd_sizes_give_masks_of_their_own_size(sam, tmp_path):
    rgba = np.zeros((37, 53, 4), np.uint8)
    rgba[..., 3] = 255
    path = tmp_path / "odd.png"
    Image.fromarray(rgba).save(path)
    assert sam.masks_from_clicks(str(path), [(26, 18)]).shape == (37, 53)


def test_bad_clicks_are_refused(sam):
    with pytest.raises(StudioError, match="click on the object"):
        sam.masks_from_clicks(IMAGE, [])
    with pytest.raises(StudioError, match="2 clicks but 1 labels"):
        sam.masks_from_clicks(IMAGE, [(1, 1), (2, 2)], [1])
    with pytest.raises(StudioError, match="1 \\(on the object\\) or 0"):
        sam.masks_from_clicks(IMAGE, [(1, 1)], [2])
    with pytest.raises(StudioError, match="at least once"):
        sam.masks_from_clicks(IMAGE, [(1, 1)], [0])
    with pytest.raises(StudioError, match="outside the 80x48 image"):
        sam.masks_from_clicks(IMAGE, [(90, 1)])
    with pytest.raises(StudioError, match="right > left"):
        sam.masks_from_clicks(IMAGE, boxes=(20, 3, 10, 11))


def test_automatic_masks_come_through_the_generator_with_the_image_size(sam):
    masks = sam.automatic(IMAGE, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, min_area=0.0,
                          max_area=1.0)
    assert len(masks) >= 1 and all(m.shape == (48, 80) and m.dtype == bool for m in masks)
    assert sam.automatic(IMAGE, points_per_side=4, pred_iou_thresh=1.01) == []     # a threshold nothing passes
    with pytest.raises(StudioError, match="bad option"):
        sam.automatic(IMAGE, no_such_option=1)


# -- checkpoints -----------------------------------------------------------------------------------------
def test_safetensors_checkpoint_round_trips_exactly(sam, tmp_path):
    path = sam.save(tmp_path / "tiny-sam.safetensors")
    back = SamMasks.load(path, device="cpu")
    assert back.config == sam.config == config_of(sam.sam)
    for (name, a), (_, b) in zip(sam.sam.state_dict().items(), back.sam.state_dict().items()):
        assert torch.equal(a, b), name
    np.testing.assert_array_equal(back.masks_from_clicks(IMAGE, [(10, 5)]), sam.masks_from_clicks(IMAGE, [(10, 5)]))


def test_pth_with_plain_tensors_loads_and_its_architecture_is_read_from_the_shapes(sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(sam.sam.state_dict(), path)
    assert infer_config(torch.load(path, weights_only=True)) == sam.config
    back = SamMasks.load(path, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(sam.sam.state_dict().values(), back.sam.state_dict().values()))


def test_official_architectures_are_recognised_from_their_weights():
    with torch.device("meta"):          # shapes only: no memory, no time
        state = build_sam(PRESETS["vit_b"]).state_dict()
    assert infer_config(state) == PRESETS["vit_b"]
    assert infer_config({}, "vit_l") == PRESETS["vit_l"]
    with pytest.raises(StudioError, match="vit_b, vit_l or vit_h"):
        infer_config(state, "vit_q")
    with pytest.raises(StudioError, match="not a Segment Anything checkpoint"):
        infer_config({"unet.conv_in.weight": torch.zeros(1)})


class Payload:
    def __reduce__(self):
        return (print, ("this ran while unpickling",))


def test_pickles_that_could_run_code_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "payload": Payload()}, path)
    with pytest.raises(StudioError, match="refused to load evil.pth"):
        SamMasks.load(path)
    (tmp_path / "broken.pth").write_bytes(b"\x00" * 10)
    with pytest.raises(StudioError, match="cannot read broken.pth"):
        SamMasks.load(tmp_path / "broken.pth")


def test_missing_checkpoint_says_what_to_download_and_what_still_works(tmp_path):
    for missing in (None, "", tmp_path / "sam_vit_b_01ec64.pth"):
        with pytest.raises(StudioError) as err:
            SamMasks.load(missing)
        text = str(err.value)
        assert SAM_VIT_B in text and SAM_VIT_B_URL in text and "--sam-checkpoint" in text
        assert "Find concepts" in text and "drawing" in text


def test_a_checkpoint_of_another_architecture_is_refused(sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(sam.sam.state_dict(), path)
    with pytest.raises(StudioError, match="does not fit a Segment Anything ViT-B"):
        SamMasks.load(path, model_type="vit_b", device="cpu")
    state, config = read_checkpoint(sam.save(tmp_path / "t.safetensors"))
    assert config == sam.config and set(state) == set(sam.sam.state_dict())
