"""The Attention tab's handlers (no browser), the tab served through gradio_client, and the CLI."""
import json

import gradio as gr
import pytest
from conftest import free_port
from gradio_client import Client
from PIL import Image

from components import attention_tab as tab
from studio.attention.result import ResultCache
from studio.cli import main
from studio.errors import StudioError
from studio.toyworld.scenes import make_scene

#          mode, prompt, negative, seed, steps, guidance, sampler, per_step, heads, self_step, image, timestep,
RUN = ["Generate", "a red circle and a blue square", "", "3", 4, 7.5, "DPM++ 2M", True, True, -1, None, 100,
       # repeats, method, subjects, scale_factor, max_iter, thresholds, resolution, reweight, compare
       2, "none", "circle, square", 20, 25, "0:0.05, 10:0.5, 20:0.8", "8", "", True]
#       words, special, branch, resolutions, blocks, head, from, to, scrub, cmap, alpha, normalization, tau, outline
VIEW = ["", False, "prompt", ["16", "8", "4"], ["down", "mid", "up"], "mean", 0, 3, -1, "jet", 0.5, "word", 0.4, True]


def test_handlers_run_render_click_components_export(manager):
    cache = ResultCache()
    key, base_key, status = tab.run(manager, cache, *RUN)
    assert base_key is None and "seed 3" in status
    sliders = tab.after_run(cache, key)
    assert sliders[4].choices[-1][0] == "3"  # heads 0..3 kept
    tiles, rows, base = tab.render(cache, key, None, *VIEW)
    assert [label for _, label in tiles] == ["a", "red", "circle", "and", "a (2)", "blue", "square"] and base == []
    assert rows[2][0] == "circle" and 0 < rows[2][2] <= 1
    scrubbed = tab.render(cache, key, None, *VIEW[:8], 2, *VIEW[9:])  # one step
    assert scrubbed[1][2][2] != rows[2][2]
    marked, heat = tab.click(cache, key, [128, 40], ["16"], ["down", "up"], "mean", "viridis")
    assert marked.size == heat.size == (tab.DISPLAY, tab.DISPLAY)
    assert len(tab.self_components(cache, key, 3, "gray")) == 3
    files = tab.export_files(cache, key, "circle, square", *VIEW[1:])
    assert [f.rsplit("/", 1)[1] for f in files] == ["grid.png", "image-0.png", "maps.npz", "manifest.json"]
    # with control, a baseline on the same seed comes along
    guided = RUN[:13] + ["attend-excite"] + RUN[14:]
    key2, base2, status2 = tab.run(manager, cache, *guided)
    assert base2 and "attend-excite" in status2 and "same seed" in status2
    assert len(tab.render(cache, key2, base2, *VIEW)[2]) == 7
    # an uploaded image
    image = Image.fromarray(make_scene(0).image)
    key3, _, status3 = tab.run(manager, cache, tab.MODES[1], *RUN[1:10], image, *RUN[11:])
    assert "t=100" in status3 and tab.render(cache, key3, None, *VIEW)[0]
    with pytest.raises(StudioError, match="no attention result"):
        tab.render(cache, None, None, *VIEW)
    with pytest.raises(StudioError, match="no image: upload one first"):
        tab.run(manager, cache, tab.MODES[1], *RUN[1:])


def test_tab_served_runs_and_exports_and_reports_bad_words(manager):
    with gr.Blocks() as demo:
        with gr.Tab("Attention"):
            ns = tab.build(manager)
    assert ns.run_event is not None and len(ns.inputs.view) == len(VIEW)
    demo.queue().launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        status = client.predict(*RUN, api_name="/attention_run")  # the result keys stay in gr.State
        assert "seed 3" in status
        bad = RUN[:13] + ["attend-excite", "circle, hexagon"] + RUN[15:]
        with pytest.raises(Exception, match="'hexagon' is not a word of the prompt"):
            client.predict(*bad, api_name="/attention_run")
    finally:
        demo.close()
    assert manager.history() == []


def test_cli_writes_grid_maps_and_manifest(tmp_path, capsys):
    out = tmp_path / "maps"
    code = main(["attention", "--prompt", "a red circle and a blue square", "--words", "circle,square",
                 "--out", str(out), "--steps", "3", "--seed", "2", "--resolutions", "16,8", "--tau", "0.5"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "image-0.png", "manifest.json", "maps.npz"]
    m = json.loads((out / "manifest.json").read_text())
    assert m["seeds"] == [2] and m["tau"] == 0.5 and [layer["used"] for layer in m["layers"]].count(False) == 1
    assert main(["attention", "--prompt", "a red circle", "--words", "dog", "--out", str(tmp_path / "x")]) == 2
    assert "'dog' is not a word of the prompt" in capsys.readouterr().err and not (tmp_path / "x").exists()
