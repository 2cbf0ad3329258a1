"""Automatic concept localization from self-attention, image preparation and mask checks."""
import numpy as np
import pytest
import torch
from PIL import Image

from studio.errors import StudioError
from studio.extract.localize import (AttentionFeatures, aggregate_self_attention, check_masks, concept_masks,
                                     find_concepts, kl_kmeans, localize, prepare_image, select_concepts)
from studio.images import crop_box, fit_mask
from studio.toyworld.scenes import BACKGROUND, make_scene

torch.set_num_threads(1)
SEEDS = (11, 5000, 5002, 5004, 5006, 5007)   # 11: the Extract tab's toy scene; 5000..: the benchmark's (not tuned on)


def iou(a, b):
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def best_match(found, truth):
    """Mean IoU of the true masks under the better of the two one-to-one matchings (two objects)."""
    if len(found) < 2:
        return max((iou(found[0], t) for t in truth), default=0.0) / 2 if found else 0.0
    return max((iou(found[0], truth[0]) + iou(found[1], truth[1])) / 2,
               (iou(found[0], truth[1]) + iou(found[1], truth[0])) / 2)


# -- the method on the toy world -------------------------------------------------------------------------
def test_found_masks_match_the_generator_masks_on_two_object_scenes(toy):
    scores = []
    for seed in SEEDS:
        scene = make_scene(seed, n_objects=2, held_out=True)
        masks = find_concepts(toy, scene.image)
        assert len(masks) == 2, f"scene {seed}: found {len(masks)} concepts"
        assert all(m.shape == (64, 64) and m.dtype == bool for m in masks)
        assert not (masks[0] & masks[1]).any()            # one pixel, one concept
        score = best_match(masks, [o.mask for o in scene.objects])
        assert score >= 0.45, f"scene {seed}: IoU {score:.2f}"
        scores.append(score)
    # the bar is 0.6 (the bench measures 0.80 on 32 scenes); these scenes score 0.85, and masks made
    # of the clusters themselves instead of their key maps score 0.74 here
    assert np.mean(scores) >= 0.77, scores


def test_masks_come_left_to_right_and_count_is_obeyed(toy):
    scene = make_scene(11, n_objects=2, held_out=True)
    left = min(scene.objects, key=lambda o: np.nonzero(o.mask)[1].mean())
    masks = find_concepts(toy, scene.image, count=2)
    xs = [np.nonzero(m)[1].mean() for m in masks]
    assert xs[0] < xs[1] and iou(masks[0], left.mask) > 0.5
    one = find_concepts(toy, scene.image, count=1)
    assert len(one) == 1 and max(iou(one[0], o.mask) for o in scene.objects) > 0.5


def test_attention_only_masks_still_find_the_objects(toy):
    scene = make_scene(5000, n_objects=2, held_out=True)
    masks = find_concepts(toy, scene.image, refine=False)
    assert len(masks) == 2 and best_match(masks, [o.mask for o in scene.objects]) >= 0.5


def test_capture_leaves_the_model_as_it_was(toy):
    unet = toy.pipe.unet
    before = dict(unet.attn_processors)
    fingerprint = toy.fingerprint()
    loc = localize(toy, make_scene(11, n_objects=2, held_out=True).image)
    assert all(unet.attn_processors[n] is p for n, p in before.items())
    assert toy.fingerprint() == fingerprint and toy.stack.position == 0
    f = loc.features
    assert f.grid == (16, 16) and f.affinity.shape == (256, 256)
    torch.testing.assert_close(f.affinity.sum(1), torch.ones(256))
    assert any(".attn1." in n for n in f.layers) and not any("mid_block" in n for n in f.layers)  # 4x4 left out


def test_plain_images_have_no_object(toy):
    for image in (np.full((64, 64, 3), BACKGROUND, np.uint8), np.full((64, 64, 3), 255, np.uint8)):
        with pytest.raises(StudioError, match="no object found"):
            find_concepts(toy, image)


def test_odd_sized_transparent_upload_gives_masks_in_its_own_pixels(toy):
    """A 128x96 RGBA upload: the scene (x1.5) in the middle, transparent bands at the sides."""
    scene = make_scene(5000, n_objects=2, held_out=True)   # left and right: a wrong crop mapping shows
    big = np.asarray(Image.fromarray(scene.image).resize((96, 96), Image.NEAREST))
    canvas = np.zeros((96, 128, 4), np.uint8)
    canvas[:, 16:112, :3], canvas[:, 16:112, 3] = big, 255
    masks = find_concepts(toy, canvas)
    assert len(masks) == 2 and all(m.shape == (96, 128) for m in masks)
    assert not any(m[:, :16].any() or m[:, 112:].any() for m in masks)     # nothing in the cropped-away bands
    truth = []
    for o in scene.objects:
        t = np.zeros((96, 128), bool)
        t[:, 16:112] = np.asarray(Image.fromarray(o.mask).resize((96, 96), Image.NEAREST))
        truth.append(t)
    assert best_match(masks, truth) >= 0.7


def test_bad_options_are_refused(toy):
    image = make_scene(11, n_objects=2, held_out=True).image
    with pytest.raises(StudioError, match="number of concepts"):
        find_concepts(toy, image, count=0)
    with pytest.raises(StudioError, match="timestep"):
        find_concepts(toy, image, timestep=5000)
    with pytest.raises(StudioError, match="saliency"):
        localize(toy, image, saliency="loud")


# -- pure parts on synthetic attention --------------------------------------------------------------------
def synthetic_features():
    """A 16x16 grid: two 4x4 objects that attend to themselves, a background that attends to them."""
    h = w = 16
    objects = [np.zeros((h, w), bool), np.zeros((h, w), bool)]
    objects[0][4:8, 2:6], objects[1][9:13, 10:14] = True, True
    a = torch.full((h * w, h * w), 1.0)
    for o in objects:
        idx = torch.from_numpy(o.flatten())
        a[idx.nonzero()[:, 0][:, None], idx.nonzero()[:, 0][None]] = 40.0    # inside: strongly to itself
        a[~idx, :] += 3.0 * idx.float()                                       # everyone else: a little to it
    a = a / a.sum(1, keepdim=True)
    return AttentionFeatures(a, (h, w), torch.ones(h, w), ["synthetic"], 0), objects


def test_kl_kmeans_and_selection_find_the_self_attending_regions():
    f, objects = synthetic_features()
    labels, centroids = kl_kmeans(f.affinity, 4, seed=0)
    assert labels.shape == (256,) and centroids.shape[1] == 256
    for o in objects:  # each object is one cluster of its own
        inside = labels[torch.from_numpy(o.flatten())]
        assert (inside == inside[0]).all() and not (labels[~torch.from_numpy(o.flatten())] == inside[0]).any()
    things = select_concepts(f, labels)
    assert len(things) == 2
    soft = concept_masks(things, 64)
    masks = [(s >= 0.5).numpy() for s in soft]
    truth = [np.kron(o, np.ones((4, 4), bool)) for o in objects]
    assert best_match(masks, truth) > 0.7


def test_aggregation_resamples_layers_to_one_row_stochastic_grid():
    torch.manual_seed(0)
    qk = {"fine": (torch.randn(2, 2, 64, 4), torch.randn(2, 2, 64, 4)),
          "coarse": (torch.randn(2, 2, 16, 4), torch.randn(2, 2, 16, 4)),
          "tiny": (torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4))}
    a, grid, used = aggregate_self_attention(qk, {"fine": (8, 8), "coarse": (4, 4), "tiny": (2, 2)})
    assert grid == (8, 8) and a.shape == (64, 64) and used == ["fine", "coarse"]
    torch.testing.assert_close(a.sum(1), torch.ones(64))
    with pytest.raises(StudioError, match="no self-attention"):
        aggregate_self_attention({}, {})


# -- image preparation -------------------------------------------------------------------------------------
def test_prepare_image_flattens_alpha_on_white_and_crops_odd_sizes(tmp_path):
    rgba = np.zeros((30, 50, 4), np.uint8)
    rgba[..., 0], rgba[:, 25:, 3] = 200, 255          # left half transparent, right half opaque red-ish
    picture, notes = prepare_image(rgba, 64)
    assert picture.shape == (64, 64, 3) and picture.dtype == np.uint8
    assert (picture[:, :8] == 255).all()               # transparent -> white
    assert (picture[:, -8:, 0] == 200).all() and (picture[:, -8:, 1:] == 0).all()
    assert [w for w in ("white", "cropped", "resized") if any(w in n for n in notes)] == ["white", "cropped", "resized"]
    path = tmp_path / "odd.png"
    Image.fromarray(rgba).save(path)
    from_path, _ = prepare_image(str(path), 64)
    assert np.array_equal(from_path, picture)
    same, notes = prepare_image(np.full((64, 64, 3), 7, np.uint8), 64)
    assert notes == [] and (same == 7).all()
    floats, _ = prepare_image(np.full((64, 64, 3), 0.5, np.float32), 64)
    assert (floats == 128).all()


def test_prepare_image_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(StudioError, match="no image"):
        prepare_image(None, 64)
    with pytest.raises(StudioError, match="no such file"):
        prepare_image(str(tmp_path / "missing.png"), 64)
    (tmp_path / "junk.png").write_bytes(b"not a picture")
    with pytest.raises(StudioError, match="as an image"):
        prepare_image(str(tmp_path / "junk.png"), 64)
    with pytest.raises(StudioError, match="shape"):
        prepare_image(np.zeros((10, 10, 5), np.uint8), 64)
    with pytest.raises(StudioError, match="too small"):
        prepare_image(np.zeros((4, 40, 3), np.uint8), 64)
    with pytest.raises(StudioError, match="transparent"):
        prepare_image(np.zeros((20, 20, 4), np.uint8), 64)


def test_fit_mask_applies_the_crop_and_resize_of_prepare_image():
    assert crop_box(50, 30) == (10, 0, 40, 30)
    mask = np.zeros((30, 50), bool)
    mask[:, 10:25] = True                              # the left half of the kept square
    fitted = fit_mask(mask, 64)
    assert fitted.shape == (64, 64) and fitted[:, :30].all() and not fitted[:, 34:].any()
    assert fit_mask(mask.astype(np.uint8) * 255, 64).sum() == fitted.sum()


# -- mask checks -------------------------------------------------------------------------------------------
def square(y0, x0, size=10, shape=(64, 64)):
    m = np.zeros(shape, bool)
    m[y0:y0 + size, x0:x0 + size] = True
    return m


def test_check_masks_refuses_unusable_mask_sets():
    good = [square(5, 5), square(40, 40)]
    assert check_masks(good, (64, 64)) == []
    with pytest.raises(StudioError, match="no masks"):
        check_masks([], (64, 64))
    with pytest.raises(StudioError, match="only 1 mask"):
        check_masks(good[:1], (64, 64), minimum=2)
    assert any("one mask" in n for n in check_masks(good[:1], (64, 64)))
    with pytest.raises(StudioError, match="mask 2 is empty"):
        check_masks([good[0], np.zeros((64, 64), bool)], (64, 64))
    with pytest.raises(StudioError, match=r"mask 1 covers 100%"):
        check_masks([np.ones((64, 64), bool), good[1]], (64, 64))
    with pytest.raises(StudioError, match="masks 1 and 3 overlap"):
        check_masks([good[0], good[1], square(7, 7)], (64, 64))
    notes = check_masks([good[0], square(5, 13)], (64, 64))         # 2 of 10 columns shared: allowed, noted
    assert any("masks 1 and 2 share" in n for n in notes)
    with pytest.raises(StudioError, match="is 32x32 but the image is 64x64"):
        check_masks([good[0], square(0, 0, shape=(32, 32))], (64, 64))
    with pytest.raises(StudioError, match="2-D"):
        check_masks([np.zeros((64, 64, 3), bool)], (64, 64))
