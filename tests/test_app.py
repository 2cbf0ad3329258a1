"""The app on localhost, driven through gradio_client: generate, apply, undo, compare, errors."""
import pytest

from components.history_panel import history_view

SETTINGS = ["a red circle", "", "1", 4, 7.5, 64, 64, 2, "DPM++ 2M"]


def test_app_serves_on_loopback_and_answers_generate_apply_undo(served):
    manager, client = served
    assert client.src.startswith("http://127.0.0.1:")
    f0 = manager.fingerprint()
    gallery, status = client.predict(*SETTINGS, api_name="/generate")
    assert len(gallery) == 2 and [g["caption"] for g in gallery] == ["seed 1", "seed 2"] and "2 image(s)" in status
    message = client.predict(r"attn2\.to_v\.weight", 0.5, api_name="/apply_scale")
    assert message.startswith("Applied") and manager.stack.position == 1 and manager.fingerprint() != f0
    rows, state = history_view(manager)
    assert rows[0][1].startswith("scale") and "1 of 1 edits applied" in state
    before_after = client.predict(0, *SETTINGS, api_name="/compare")
    assert len(before_after) == 2
    client.predict(api_name="/undo")
    assert manager.stack.position == 0 and manager.fingerprint() == f0
    client.predict(api_name="/redo")
    assert manager.stack.position == 1


def test_bad_input_through_the_ui_is_a_clear_error_and_changes_nothing(served):
    manager, client = served
    f = manager.fingerprint()
    with pytest.raises(Exception, match="seed must be a whole number"):
        client.predict("a red circle", "", "abc", 4, 7.5, 64, 64, 1, "DPM++ 2M", api_name="/generate")
    with pytest.raises(Exception, match="multiple of 8"):
        client.predict("a red circle", "", "0", 4, 7.5, 60, 64, 1, "DPM++ 2M", api_name="/generate")
    with pytest.raises(Exception, match="no parameter name matches"):
        client.predict("nothing_matches_this", 0.5, api_name="/apply_scale")
    with pytest.raises(Exception, match="no edit to compare"):
        client.predict(0, *SETTINGS, api_name="/compare")
    assert manager.fingerprint() == f and manager.history() == []


def test_erase_tab_erases_reports_exports_and_refuses_bad_input(served, tmp_path):
    manager, client = served
    f0 = manager.fingerprint()
    erase = ["Closed form (UCE)", "red", "", "green, blue", "toy", "to_end", 0.5, 1, 1, 0, 1e-3, 0, 0.75,
             "esd-x", 2, 20, 0.01, 2.0, 1.0, ""]
    status, _ = client.predict(*erase, api_name="/erase")
    assert "Applied" in status and manager.stack.position == 1 and manager.fingerprint() != f0
    grid, scores, _, _ = client.predict("red", "green, blue", 1, api_name="/erase_report")
    groups = {row[0]: row for row in scores["data"]}
    assert groups["efficacy: red"][2] == "100%" and len(grid) >= 2
    path, note = client.predict("LoRA (kohya keys)", 4, api_name="/export")
    assert path.endswith(".safetensors") and "reconstruction error" in note
    with pytest.raises(Exception, match="both erased and preserved"):
        client.predict(*erase[:3], "red", *erase[4:], api_name="/erase")
    assert manager.stack.position == 1
    client.predict(api_name="/undo")
    assert manager.fingerprint() == f0


def test_stream_job_relays_previews_progress_and_errors():
    from components.common import stream_job

    ticks = []

    def job(preview, tick):
        for i in range(3):
            tick(i + 1, 3)
            preview([f"image {i}"])
        return "done"

    progress = lambda value, desc: ticks.append(value)  # noqa: E731
    updates = list(stream_job(job, progress))
    assert updates[-1] == (["image 2"], "done") and [u[0] for u in updates[:3]] == [["image 0"], ["image 1"], ["image 2"]]
    assert ticks == [(1, 3), (2, 3), (3, 3)]

    def failing(preview, tick):
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        list(stream_job(failing))


def test_customize_tab_composes_by_collage_from_painted_regions(served, tmp_path):
    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    manager, client = served
    f0 = manager.fingerprint()
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[:, :128], layer[:, 128:] = (224, 32, 32, 255), (32, 80, 224, 255)  # the red and blue brushes
    Image.fromarray(layer).save(tmp_path / "layer.png")
    Image.fromarray(np.full((256, 256, 3), 255, np.uint8)).save(tmp_path / "background.png")
    canvas = {"background": handle_file(str(tmp_path / "background.png")),
              "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}
    message = client.predict(canvas, 0.2, "red circle", "blue square", "", api_name="/regions")
    assert "collage redrawn 20%" in message and manager.stack.position == 1
    gallery, _ = client.predict("a red circle and a blue square", "", "0", 10, 7.5, 64, 64, 1, "DPM++ 2M",
                                api_name="/generate")
    image = np.asarray(Image.open(gallery[0]["image"]).convert("RGB")).astype(int)
    red = np.abs(image - [214, 39, 40]).sum(-1) < 90
    blue = np.abs(image - [31, 90, 220]).sum(-1) < 90
    assert red[:, :24].sum() > 30 > red[:, 40:].sum() and blue[:, 40:].sum() > 30 > blue[:, :24].sum()
    client.predict(api_name="/undo")
    assert manager.fingerprint() == f0
