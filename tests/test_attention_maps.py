"""Word maps, normalization, summary, maps for any image, export, and clear errors on bad input."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from studio.attention.any_image import image_maps
from studio.attention.export import export
from studio.attention.maps import Selection, binarize, normalize, overlap, summary, token_maps, word_maps
from studio.attention.run import CaptureOptions, generate_with_maps
from studio.attention.view import View, render_view
from studio.errors import StudioError
from studio.generation import GenerationRequest
from studio.images import load_rgb
from studio.toyworld.scenes import make_scene

PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def result(toy):
    return generate_with_maps(toy, GenerationRequest(PROMPT, seed=2, steps=6), CaptureOptions(per_step=True, heads=True))


def test_word_maps_average_subword_tokens_and_follow_the_selection(result):
    tokens = token_maps(result)
    assert tokens.shape == (1, 9, 16, 16)  # SOS, 7 words, EOS on the finest grid
    assert float(tokens.min()) >= 0 and float(tokens.sum(1).max()) <= 1 + 1e-5  # padding keeps the rest of the mass
    words, maps = word_maps(result, "red circle, square")
    assert [w.text for w in words] == ["red circle", "square"]
    torch.testing.assert_close(maps[:, 0], tokens[:, [2, 3]].mean(1))
    # one step of the per-step store, one head of the running sums, one resolution, one block
    _, step3 = word_maps(result, "circle", Selection(steps=(3, 3)))
    _, head1 = word_maps(result, "circle", Selection(head=1))
    _, coarse = word_maps(result, "circle", Selection(resolutions=(8,), blocks=("up",)), size=(64, 64))
    assert step3.shape == head1.shape == (1, 1, 16, 16) and coarse.shape == (1, 1, 64, 64)
    assert not torch.allclose(step3, head1)
    _, all_steps = word_maps(result, "circle", Selection(steps=(0, 5)))
    torch.testing.assert_close(all_steps, word_maps(result, "circle")[1], atol=2e-3, rtol=1e-2)  # fp16 per-step copies


def test_normalization_binarization_and_summary(result):
    _, maps = word_maps(result, "circle, square")
    assert torch.allclose(normalize(maps, "word").amax((-2, -1)), torch.ones(1, 2))
    assert float(normalize(maps, "global").max()) == pytest.approx(1) and float(normalize(maps, "global").amax((-2, -1)).min()) < 1
    r = normalize(maps, "range")
    assert float(r.amin((-2, -1)).max()) == 0 and torch.allclose(r.amax((-2, -1)), torch.ones(1, 2))
    assert torch.equal(normalize(maps, "absolute"), maps)
    assert binarize(normalize(maps), 0.4).dtype == torch.bool
    a = torch.rand(8, 8)
    assert overlap(a, a) == pytest.approx(0.5) and overlap(a * (a > 0.5), a * (a <= 0.5)) == 0
    s = summary(result, "circle, square", tau=0.4)
    circle, square = s["rows"]
    assert circle["word"] == "circle" and 0 < circle["peak"] <= 1 and 0 < circle["area"] < 1
    assert 0 <= circle["retention"] <= 1 and circle["overlaps_most_with"] == "square"
    assert s["overlaps"][("circle", "square")] == circle["max_overlap"] == square["max_overlap"]


def test_a_maps_peak_lies_inside_its_objects_mask_on_toy_scenes(toy):
    """Maps for any image: generator scenes (exact masks), the shape word's peak is on its object."""
    checked = 0
    for seed in range(6):
        scene = make_scene(seed, synonyms=False)
        shapes = [o.shape for o in scene.objects]
        if len(set(shapes)) < len(shapes):
            continue
        r = image_maps(toy, Image.fromarray(scene.image), scene.caption, timestep=50, repeats=2, self_attention=False)
        _, maps = word_maps(r, shapes, size=(64, 64))
        for obj, m in zip(scene.objects, maps[0]):
            y, x = divmod(int(m.argmax()), 64)
            assert obj.mask[y, x], (scene.caption, obj.shape, (x, y))
            checked += 1
    assert checked >= 6


def test_maps_for_an_image_average_noise_draws_and_keep_self_attention(toy):
    scene = make_scene(1)
    r = image_maps(toy, scene.image, scene.caption, timestep=200, seed=3, repeats=3, negative="a green star")
    assert r.mode == "image" and r.steps == 1 and r.branches == ("negative", "prompt")
    assert all(m.shape[1] == 1 for m in r.means.values()) and r.images[0].size == (64, 64)
    assert r.settings["timestep"] == 200 and list(r.self_qk) == [0]
    again = image_maps(toy, scene.image, scene.caption, timestep=200, seed=3, repeats=3, negative="a green star")
    assert all(torch.equal(r.means[n], again.means[n]) for n in r.means)  # seeded noise: reproducible


def test_export_writes_grid_raw_maps_and_manifest(result, tmp_path):
    view = View("circle, square", selection=Selection(steps=(1, 4)), tau=0.3, outline=True)
    paths = export(result, view, tmp_path / "out")
    assert [p.name for p in paths] == ["grid.png", "image-0.png", "maps.npz", "manifest.json"]
    grid = Image.open(paths[0])
    assert grid.width > 3 * 256 and grid.height > 256  # image + two labelled maps
    raw = np.load(paths[2])
    assert raw["word_maps"].shape == (1, 2, 16, 16) and raw["token_maps"].shape == (1, 9, 16, 16)
    assert sum(k.startswith("layer__") for k in raw) == 7 and sum(k.startswith("step__") for k in raw) == 7
    m = json.loads(paths[3].read_text())
    assert m["prompt"] == PROMPT and m["seeds"] == [2] and m["steps"] == [1, 4] and m["tau"] == 0.3
    assert [w["word"] for w in m["words"]] == ["circle", "square"] and len(m["layers"]) == 7
    assert m["summary"]["rows"][0]["word"] == "circle" and m["settings"]["sampler"] == "DPM++ 2M"


@pytest.mark.parametrize("bad, message", [
    (None, "no image: upload one first"),
    ("/nonexistent/picture.png", "no such file"),
    (np.zeros((64, 64, 5), np.uint8), "must be H x W x 3"),
    (np.zeros((4, 4, 3), np.uint8), "too small"),
    (np.full((16, 16, 3), np.nan), "NaN"),
    (3.5, "expected an image"),
])
def test_bad_images_are_refused_clearly(bad, message):
    with pytest.raises(StudioError, match=message):
        load_rgb(bad)


def test_a_file_that_is_not_an_image_is_refused(tmp_path):
    f = tmp_path / "notes.png"
    f.write_text("not really a png")
    with pytest.raises(StudioError, match="cannot read 'notes.png' as an image"):
        load_rgb(str(f))


def test_bad_requests_say_what_to_do(toy, result, tmp_path):
    cases = [
        (lambda: render_view(result, View("circle, dog")), "'dog' is not a word of the prompt"),
        (lambda: word_maps(result, "circle", Selection(steps=(2, 9))), "outside the captured steps 0..5"),
        (lambda: word_maps(result, "circle", Selection(steps=(1, 2), head=0)), "one head can be shown only over all steps"),
        (lambda: word_maps(result, "circle", Selection(head=7)), "head 7 does not exist"),
        (lambda: word_maps(result, "circle", Selection(branch="negative")), "negative-prompt maps were not captured"),
        (lambda: word_maps(result, "circle", Selection(resolutions=(32,))), "no captured layer matches"),
        (lambda: normalize(torch.ones(1, 1, 2, 2), "log"), "unknown normalization"),
        (lambda: render_view(result, View("circle", tau=1.5)), "tau must be from 0 to 1"),
        (lambda: render_view(result, View("circle", cmap="rainbowz")), "unknown colormap"),
        (lambda: image_maps(toy, make_scene(0).image, "a red circle", timestep=1000), "timestep must be from 0 to 999"),
        (lambda: image_maps(toy, make_scene(0).image, "  "), "type a prompt"),
    ]
    (tmp_path / "file").write_text("")
    cases.append((lambda: export(result, View("circle"), tmp_path / "file" / "out"), "cannot write to"))
    for fn, message in cases:
        with pytest.raises(StudioError, match=message):
            fn()
    plain = generate_with_maps(toy, GenerationRequest(PROMPT, seed=2, steps=2), CaptureOptions(per_step=False))
    with pytest.raises(StudioError, match="per-step maps were not kept"):
        word_maps(plain, "circle", Selection(steps=(0, 0)))
    with pytest.raises(StudioError, match="heads were averaged during capture"):
        word_maps(plain, "circle", Selection(head=0))
