"""Test-time attention control: the losses, the guidance loop, reweighting, stop, and bad settings."""
import numpy as np
import pytest
import torch

from studio import steering

from studio.attention.control import (
    Control,
    excite_loss,
    parse_thresholds,
    parse_weights,
    retention_loss,
    segregation_loss,
    subject_maps,
)
from studio.attention.run import CaptureOptions, compare_control, generate_with_maps
from studio.capture import gaussian_smooth
from studio.errors import JobStopped, StudioError
from studio.generation import GenerationRequest

PROMPT = "a red circle and a blue square"
NO_CAPTURE_EXTRAS = CaptureOptions(per_step=False, self_step=-1)


def test_losses_are_the_published_ones_on_synthetic_maps():
    # two subjects on a 4x4 grid: one owns a corner strongly, the other is spread thin
    maps = torch.zeros(1, 4, 4, 5)
    maps[..., 0] = 1.0  # SOS, dropped
    maps[0, 0, 0, 1] = 5.0
    maps[..., 2] = 0.01
    sm = subject_maps(maps, [[1], [2]], eos=4, smooth=(3, 0.5))
    assert sm.shape == (1, 2, 4, 4)
    loss, peaks = excite_loss(sm)
    assert float(loss) == pytest.approx(1 - float(peaks[0, 1])) and peaks[0, 0] > peaks[0, 1]  # the weakest subject
    smooth = gaussian_smooth(torch.ones(2, 4, 4))
    assert torch.allclose(smooth, torch.ones(2, 4, 4))  # a normalized kernel keeps constants
    a = torch.zeros(1, 2, 4, 4)
    a[0, 0, :2], a[0, 1, 2:] = 1, 1
    assert float(segregation_loss(a)) == 0  # apart
    assert float(segregation_loss(a[:, [0, 0]])) == pytest.approx(0.5)  # on top of each other
    assert float(retention_loss(a, a > 0.5)) == pytest.approx(0, abs=1e-6)
    assert float(retention_loss(a, a.flip(1) > 0.5)) == pytest.approx(2)  # both moved away
    assert float(retention_loss(a, None)) == 0


def test_guidance_machinery_is_transparent_at_zero_scale_and_refinement_raises_the_weakest(toy):
    request = GenerationRequest(PROMPT, seed=4, steps=4)
    plain = toy.generate(request).images[0]
    idle = Control("attend-excite", ["circle", "square"], scale_factor=0.0, thresholds={}, resolution=8)
    r = generate_with_maps(toy, request, NO_CAPTURE_EXTRAS, idle)
    assert np.array_equal(np.asarray(plain), np.asarray(r.images[0]))
    assert [row["step"] for row in r.control_log] == [0, 1]  # the first 25/50 of the steps
    # refine at step 0 until the weakest subject's peak reaches 0.999 (or 5 iterations)
    base = Control("attend-excite", ["circle", "square"], thresholds={0: 0.999}, max_refinement_steps=0,
                   max_iter_to_alter=0, resolution=8)
    refined = Control("attend-excite", ["circle", "square"], thresholds={0: 0.999}, max_refinement_steps=5,
                      max_iter_to_alter=0, resolution=8)
    before = generate_with_maps(toy, request, NO_CAPTURE_EXTRAS, base).control_log[0]
    after = generate_with_maps(toy, request, NO_CAPTURE_EXTRAS, refined).control_log[0]
    assert after["refinement_steps"] == 5 and after["loss"][0] < before["loss"][0]
    assert min(after["peaks"][0]) > min(before["peaks"][0])
    assert toy.fingerprint(cached=False) == toy.fingerprint() and toy.history() == []


def test_a_star_and_the_comparison_run_on_the_same_seed(toy):
    request = GenerationRequest(PROMPT, seed="7", steps=3)
    without, with_ = compare_control(toy, request, Control("a-star", ["circle", "square"], resolution=8))
    assert without.seeds == with_.seeds == [7] and not without.control_log
    assert len(with_.control_log) == 2 and with_.settings["control"]["method"] == "a-star"
    assert not np.array_equal(np.asarray(without.images[0]), np.asarray(with_.images[0]))


def test_reweighting_by_one_changes_nothing_and_by_three_changes_the_image(toy):
    request = GenerationRequest(PROMPT, seed=1, steps=4)
    processors = dict(toy.pipe.unet.attn_processors)
    plain = np.asarray(toy.generate(request).images[0])
    same = generate_with_maps(toy, request, NO_CAPTURE_EXTRAS, Control(reweight={"circle": 1.0}))
    more = generate_with_maps(toy, request, NO_CAPTURE_EXTRAS, Control(reweight={"circle": 3.0, "red": 0.5}))
    assert np.array_equal(plain, np.asarray(same.images[0]))
    assert not np.array_equal(plain, np.asarray(more.images[0]))
    assert all(toy.pipe.unet.attn_processors[n] is p for n, p in processors.items())


def test_stop_ends_a_guided_run_cleanly(toy):
    processors = dict(toy.pipe.unet.attn_processors)

    def stop_after_first(done, total):
        if done == 1:
            toy.request_stop()

    with pytest.raises(JobStopped):
        generate_with_maps(toy, GenerationRequest(PROMPT, seed=0, steps=6), NO_CAPTURE_EXTRAS,
                           Control("attend-excite", ["circle", "square"], resolution=8), progress=stop_after_first)
    assert all(toy.pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert steering.slots(toy.pipe) == [] and toy.history() == []
    toy.generate(GenerationRequest(PROMPT, seed=0, steps=1))  # the next job runs normally


@pytest.mark.parametrize("control, message", [
    (Control("magic", ["circle"]), "unknown guidance method 'magic'"),
    (Control("attend-excite", []), "needs subject words"),
    (Control("a-star", ["circle"]), "at least two subject words"),
    (Control("attend-excite", ["circle", "dog"]), "'dog' is not a word of the prompt"),
    (Control("attend-excite", ["circle"], resolution=32), "no attention resolution 32"),
    (Control(reweight={"hexagon": 2.0}), "'hexagon' is not a word of the prompt"),
])
def test_bad_control_settings_are_clear_errors(toy, control, message):
    with pytest.raises(StudioError, match=message):
        generate_with_maps(toy, GenerationRequest(PROMPT, seed=0, steps=2), NO_CAPTURE_EXTRAS, control)
    assert steering.slots(toy.pipe) == []


def test_parsing_thresholds_and_weights():
    assert parse_thresholds("0:0.05, 10:0.5,20:0.8") == {0: 0.05, 10: 0.5, 20: 0.8} and parse_thresholds("") == {}
    assert parse_weights("circle=2, red = 0.5") == {"circle": 2.0, "red": 0.5}
    for bad, fn, message in [("10-0.5", parse_thresholds, "thresholds look like"), ("0:3", parse_thresholds, "from 0 to 1"),
                             ("circle:2", parse_weights, "reweighting looks like"), ("=2", parse_weights, "reweighting")]:
        with pytest.raises(StudioError, match=message):
            fn(bad)
