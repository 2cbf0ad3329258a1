"""The studio used carelessly or with hostile input: each case here was a defect found by probing the app."""
import json
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import studio.manager as manager_module
from studio.edit_files import MAX_EDITS, SavedEdit, read_tensors, save_edits, save_tensors
from studio.edits import Edit, Entry, edit_kind
from studio.errors import JobStopped, StudioError
from studio.generation import GenerationRequest
from studio.images import MAX_SIDE, open_image
from studio.layer_scale import scale_edit
from studio.manager import OWNER, PipelineManager

V, Q = r"attn2\.to_v\.weight", r"attn1\.to_q\.weight"


@edit_kind("test_presses_stop")
def _presses_stop(pipe, params, tensors, patch):
    """An edit during whose application the user presses Stop (as during a long file load)."""
    params["manager"].request_stop()


def state(m):
    return [e.edit.title for e in m.stack.entries], m.stack.position, m.fingerprint()


def edit_file(tmp_path, records, name="bad.safetensors", **meta):
    """An edit file with these metadata records (no tensors needed)."""
    meta = {"format": "concept-studio-edits", "version": 1, "edits": records, **meta}
    return save_tensors({"x": torch.zeros(1)}, tmp_path / name, meta)


# -- stop ---------------------------------------------------------------------------------------------
def test_stop_is_per_job_another_users_stop_does_not_end_it(toy):
    ended = []

    def long_job():
        OWNER.set("alice")
        with toy.job():
            try:
                for _ in range(200):
                    toy.check_stop()
                    time.sleep(0.01)
                ended.append("ran to the end")
            except JobStopped:
                ended.append("stopped")

    for stopper, outcome in (("bob", "ran to the end"), ("alice", "stopped")):
        ended.clear()
        worker = threading.Thread(target=long_job)
        worker.start()
        time.sleep(0.3)
        toy.request_stop(stopper)
        worker.join(30)
        assert ended == [outcome], stopper


ESD = ["Fine-tuned LoRA (ESD)", "red", "", "green, blue", "toy", "to_end", 0.5, 1, 1, 0, 1e-3, 0, 0.75,
       "esd-x", 2, 1000, 0.01, 2.0, 1.0, ""]  # the Erase tab's inputs: 1000 ESD steps


def test_in_the_app_a_stop_ends_only_the_job_of_the_session_that_pressed_it(served):
    from gradio_client import Client
    from gradio_client.utils import Status

    manager, client = served
    fingerprint, other = manager.fingerprint(), Client(client.src, verbose=False)
    job = client.submit(*ESD, api_name="/erase")
    deadline = time.time() + 300
    while job.status().code != Status.PROGRESS:
        assert time.time() < deadline and not job.done(), job.status()
        time.sleep(0.2)
    other.predict(api_name="/stop")  # another user's Stop
    time.sleep(3)
    assert not job.done() and manager._depth == 1
    client.predict(api_name="/stop")  # its own user's
    job.result(timeout=120)
    assert manager.fingerprint() == fingerprint and manager.history() == []


def test_a_stop_during_an_edit_file_load_ends_it_and_leaves_the_stack_as_it_was(toy):
    toy.apply(scale_edit(V, 0.5))
    toy.undo()  # 0 of 1 applied: a redo tail the load must not lose
    before = state(toy)
    saved = [SavedEdit(e) for e in (scale_edit(Q, 2.0), Edit("test_presses_stop", {"manager": toy}), scale_edit(V, 0.9))]
    try:
        with pytest.raises(JobStopped):
            with toy.job():
                toy._apply_saved(saved)
        assert state(toy) == before and toy.redo() is not None
    finally:
        toy.stack.goto(0)
        del toy.stack.entries[:]


def test_a_stop_while_prior_images_are_drawn_ends_the_job_there(toy):
    from studio.customize.train import prior_latents

    with toy.job():
        toy.request_stop()
        with pytest.raises(JobStopped):
            prior_latents(toy, ["a red circle"], 8, seed=0)


# -- history writes -----------------------------------------------------------------------------------
def test_a_history_write_that_fails_is_a_warning_not_a_failed_edit_and_no_older_state_comes_back(tmp_path, monkeypatch):
    m = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    m.apply(scale_edit(V, 0.5))  # saved
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: No space left on device")

    monkeypatch.setattr(manager_module, "save_edits", full_disk)
    entry = m.apply(scale_edit(Q, 2.0))  # the edit succeeds; only the history is not saved
    assert entry.edit.title.startswith("scale") and m.stack.position == 2
    assert "not being saved" in m.history_warning and "No space left" in m.history_warning
    monkeypatch.undo()
    again = PipelineManager("builtin", device="cpu", history_dir=tmp_path)  # not the older one-edit state
    assert again.history() == [] and (tmp_path / (m.history_path.name + ".stale")).is_file()
    m.apply(scale_edit(V, 0.9))  # a write that works again clears the warning
    assert m.history_warning == ""


SECOND = textwrap.dedent(r"""
    import sys
    from studio.layer_scale import scale_edit
    from studio.manager import PipelineManager

    m = PipelineManager("builtin", device="cpu", history_dir=sys.argv[1])
    m.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    print("ready", flush=True)
    sys.stdin.read()
""")


def test_a_second_process_on_the_same_history_says_so_and_does_not_overwrite_it(tmp_path):
    first = subprocess.Popen([sys.executable, "-c", SECOND, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "ready"
        second = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
        assert [r["edit"] for r in second.history()] == ["scale /attn2\\.to_v\\.weight/ x0.5"]  # read, not owned
        assert "Another Concept Studio process" in second.history_warning
        second.undo()
        second.apply(scale_edit(Q, 2.0))
        assert not list(tmp_path.glob("*.tmp"))
    finally:
        first.communicate("")
    third = PipelineManager("builtin", device="cpu", history_dir=tmp_path)  # the first process's state, intact
    assert [(r["edit"], r["applied"]) for r in third.history()] == [("scale /attn2\\.to_v\\.weight/ x0.5", True)]


# -- loads --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [Edit("no_such_kind"), scale_edit(V, float("nan"))])
def test_a_failed_edit_file_load_keeps_the_redo_tail(toy, tmp_path, bad):
    toy.apply(scale_edit(V, 0.5))
    good = toy.stack.entries[-1]
    path = tmp_path / "two.safetensors"
    save_edits([good, Entry(bad, good.patch)], path)
    toy.undo()
    before = state(toy)
    try:
        with pytest.raises(StudioError):
            toy.load_edits(path)
        assert state(toy) == before and len(toy.stack.entries) == 1
    finally:
        toy.stack.goto(0)
        del toy.stack.entries[:]


@pytest.mark.parametrize("records, why", [
    ('{"a": 1}', "list"), ("[1, 2]", "not a record"), ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (json.dumps([{"kind": "scale", "params": {}, "tensors": [], "originals": [1]}]), "wrong type"),
    (json.dumps([{"kind": "scale", "params": {}}]), "no 'tensors' entry"),
    ("{not json", "damaged"),
    (json.dumps([{"kind": "scale", "params": {}, "tensors": [], "label": "x" * 1000}]), "label"),
    (json.dumps([{"kind": "scale", "params": {}, "tensors": []}] * (MAX_EDITS + 1)), f"at most {MAX_EDITS}"),
])
def test_a_malformed_history_is_set_aside_at_start_and_a_malformed_edit_file_refused(tmp_path, records, why):
    m = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    m.pipe
    edit_file(tmp_path, records, m.history_path.name, position=0)
    fresh = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    assert fresh.history() == [] and "could not be restored" in fresh.restore_notes[0]
    assert "damaged" in fresh.restore_notes[0] and why in fresh.restore_notes[0]
    path = edit_file(tmp_path, records)
    with pytest.raises(StudioError, match="damaged"):
        m.load_edits(path)
    assert m.history() == []


def test_a_load_whose_backups_do_not_fit_is_refused_before_anything_is_applied(toy, tmp_path, monkeypatch):
    toy.apply(scale_edit(V, 0.99))
    toy.save_edits(tmp_path / "big.safetensors")
    toy.undo()
    before = state(toy)
    monkeypatch.setattr(manager_module, "backup_budget", lambda: 1000)
    applied = []
    monkeypatch.setattr(toy.stack, "apply", lambda e: applied.append(e))
    try:
        with pytest.raises(StudioError, match=r"MB or more of backups for undo; this machine has room for 0 MB"):
            toy.load_edits(tmp_path / "big.safetensors")
        assert applied == [] and state(toy) == before
    finally:
        monkeypatch.undo()
        toy.stack.goto(0)
        del toy.stack.entries[:]


def test_a_file_that_under_declares_its_backups_is_stopped_once_they_pass_the_budget(toy, tmp_path, monkeypatch):
    entry = toy.apply(scale_edit(V, 0.99))
    kept = dict(entry.patch.originals)
    entry.patch.originals.clear()  # a crafted file: no tensor names recorded, so nothing to estimate
    toy.save_edits(tmp_path / "crafted.safetensors")
    entry.patch.originals.update(kept)
    toy.undo()
    before = state(toy)
    monkeypatch.setattr(manager_module, "backup_budget", lambda: 1000)
    try:
        with pytest.raises(StudioError, match="room for 0 MB"):
            toy.load_edits(tmp_path / "crafted.safetensors")
        assert state(toy) == before
    finally:
        toy.stack.goto(0)
        del toy.stack.entries[:]


def test_a_history_too_big_for_memory_is_kept_not_restored_and_not_written_over(tmp_path, monkeypatch):
    m = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    m.apply(scale_edit(V, 0.5))
    path, saved = m.history_path, m.history_path.read_bytes()
    monkeypatch.setattr(manager_module, "backup_budget", lambda: 1000)
    fresh = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    assert fresh.history() == [] and "not restored" in fresh.restore_notes[0] and "damaged" not in fresh.restore_notes[0]
    assert "MB or more of backups for undo; this machine has room for 0 MB" in fresh.restore_notes[0]
    assert str(path) in fresh.restore_notes[0] and "not saved" in fresh.history_warning
    fresh.undo()
    fresh.apply(scale_edit(Q, 2.0))  # the user works on: the file that could not be restored stays as it was
    assert path.read_bytes() == saved and not list(tmp_path.glob("*.unreadable")) and not list(tmp_path.glob("*.stale"))
    path.rename(tmp_path / "kept.safetensors")  # the user moves it away: this session's history is saved again
    fresh.apply(scale_edit(V, 0.9))
    assert fresh.history_warning == "" and path.is_file() and path.read_bytes() != saved


@pytest.mark.parametrize("version, refused", [("1", False), ("0", False), (None, False), ("2", True), ("1.0", True),
                                              ("x", True)])
def test_edit_files_of_an_unknown_version_are_refused(toy, tmp_path, version, refused):
    toy.apply(scale_edit(V, 0.5))
    toy.save_edits(tmp_path / "one.safetensors")
    toy.undo()
    del toy.stack.entries[:]
    tensors, meta = read_tensors(tmp_path / "one.safetensors")
    meta = {k: v for k, v in meta.items() if k != "version"} | ({} if version is None else {"version": version})
    save_tensors(tensors, tmp_path / "other.safetensors", meta)
    try:
        if refused:
            with pytest.raises(StudioError, match=re.escape(f"newer Concept Studio, or is damaged (format '{version}')")):
                toy.load_edits(tmp_path / "other.safetensors")
        else:
            assert toy.load_edits(tmp_path / "other.safetensors")[0].endswith("re-applied exactly")
    finally:
        toy.stack.goto(0)
        del toy.stack.entries[:]


# -- patterns -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("pattern", [r"(.*.*)*Z", r"(\w|\.|_)*(\w|\.)*Q", r"((a+)+)+$", "x" * 300])
def test_no_layer_pattern_holds_the_server(toy, pattern):
    outcome = []

    def apply():
        try:
            toy.apply(scale_edit(pattern, 0.5))
        except StudioError as exc:
            outcome.append(str(exc))

    worker = threading.Thread(target=apply, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and outcome and toy.stack.position == 0


# -- big inputs ---------------------------------------------------------------------------------------
def test_a_huge_picture_is_reduced_as_it_is_opened(tmp_path):
    Image.new("RGB", (9000, 6000), (200, 30, 30)).save(tmp_path / "huge.png")
    im = open_image(tmp_path / "huge.png")
    assert max(im.size) <= MAX_SIDE and im.info["original_size"] == (9000, 6000)
    assert abs(im.width / im.height - 1.5) < 0.01 and np.asarray(im)[0, 0].tolist() == [200, 30, 30]


def test_a_megabyte_prompt_is_refused_at_once_with_the_limit(toy):
    start = time.perf_counter()
    with pytest.raises(StudioError, match="characters long; the limit is"):
        toy.generate(GenerationRequest("a red circle " * 300_000, steps=1))
    assert time.perf_counter() - start < 5


# -- messages -----------------------------------------------------------------------------------------
def test_unclear_messages_say_what_is_wrong(toy, tmp_path):
    with pytest.raises(StudioError, match="not text at position 2"):
        toy.generate(GenerationRequest("a \ud800 circle", steps=1))
    with pytest.raises(StudioError, match="#0 is the model as loaded"):
        toy.apply(scale_edit(V, 0.5))
        toy.compare(GenerationRequest("a red circle", steps=1), 0)
    toy.undo()
    del toy.stack.entries[:]
    warning = GenerationRequest("red circle " * 60).validated(toy.pipe).warnings[0]
    assert "</w>" not in warning and "red circle red" in warning
    save_tensors({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    save_tensors({"some.weight": torch.zeros(2, 2)}, tmp_path / "random.safetensors")
    for name, says in (("lora", "is a LoRA"), ("random", "holds no Stable Diffusion UNet weights")):
        with pytest.raises(StudioError, match=says):
            PipelineManager(str(tmp_path / f"{name}.safetensors"), device="cpu").pipe
    (tmp_path / "sdxl").mkdir()
    (tmp_path / "sdxl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(StudioError, match="holds a StableDiffusionXLPipeline pipeline; the studio runs Stable"):
        PipelineManager(str(tmp_path / "sdxl"), device="cpu").pipe
    edit_file(tmp_path, "{not json", "broken.safetensors")
    with pytest.raises(StudioError, match="damaged or was not written by Concept Studio") as err:
        toy.load_edits(tmp_path / "broken.safetensors")
    assert str(err.value) != "'edits'"
    with pytest.raises(StudioError) as err:
        open_image(tmp_path / "secret" / "nowhere.png")
    assert str(tmp_path) not in str(err.value)


def test_labels_from_files_are_escaped_where_the_ui_shows_them():
    from components.common import toast

    assert toast("<img src=x onerror=alert(1)> <b>x</b>") == "&lt;img src=x onerror=alert(1)&gt; &lt;b&gt;x&lt;/b&gt;"
    assert toast("it's 'fine'") == "it's 'fine'"
