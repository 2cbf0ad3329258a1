"""The edit history survives restarts and kills: saved atomically after every change, restored exactly."""
import subprocess
import sys
import textwrap

import torch

from studio.edits import named_tensors
from studio.layer_scale import scale_edit
from studio.loading import TOY_MODEL
from studio.manager import PipelineManager

V, Q = r"attn2\.to_v\.weight", r"attn1\.to_q\.weight"


def rows(m):
    return [(r["edit"], r["applied"]) for r in m.history()]


def test_history_comes_back_with_its_position_and_redo_tail(tmp_path):
    a = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    a.apply(scale_edit(V, 0.5))
    a.apply(scale_edit(Q, 2.0))
    after_both = a.fingerprint()
    a.undo()
    b = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    assert rows(b) == rows(a) == [("scale /attn2\\.to_v\\.weight/ x0.5", True), ("scale /attn1\\.to_q\\.weight/ x2", False)]
    assert b.fingerprint() == a.fingerprint()
    assert all(torch.equal(t, named_tensors(a.pipe)[n]) for n, t in named_tensors(b.pipe).items())
    assert "restored 2 edit(s)" in b.restore_notes[0] and "re-applied exactly" in b.restore_notes[1]
    b.redo()
    assert b.fingerprint() == after_both
    b.reset()  # the reset is saved too
    assert PipelineManager("builtin", device="cpu", history_dir=tmp_path).history()[0]["applied"] is False


def test_each_model_keeps_its_own_history_and_an_unreadable_file_is_set_aside(tmp_path):
    m = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    m.apply(scale_edit(V, 0.5))
    toy_file = m.history_path
    m.load(str(TOY_MODEL))  # the same weights as a folder: another model source, its own history
    assert m.history() == [] and m.history_path != toy_file
    m.load("builtin")
    assert rows(m) == [("scale /attn2\\.to_v\\.weight/ x0.5", True)]
    toy_file.write_bytes(b"not a safetensors file")
    fresh = PipelineManager("builtin", device="cpu", history_dir=tmp_path)
    assert fresh.history() == [] and "could not be restored" in fresh.restore_notes[0]
    assert toy_file.with_name(toy_file.name + ".unreadable").is_file() and not toy_file.exists()


KILLED = textwrap.dedent(r"""
    import sys, time
    import studio.edit_files as files
    from studio.edits import Edit, edit_kind
    from studio.layer_scale import scale_edit
    from studio.manager import PipelineManager

    where, folder = sys.argv[1:]
    m = PipelineManager("builtin", device="cpu", history_dir=folder)
    m.apply(scale_edit(r"attn2\.to_v\.weight", 0.5))
    print(m.fingerprint(), flush=True)

    @edit_kind("zero_then_hang")
    def zero_then_hang(pipe, params, tensors, patch):
        name = "unet.conv_in.weight"
        patch.write(name, patch.read(name) * 0)  # half-way through an edit
        print("killing", flush=True)
        time.sleep(600)

    def half_written(tensors, path, metadata):
        real(tensors, path, metadata=metadata)
        with open(path, "r+b") as f:
            f.truncate(100)  # the new file is half on disk
        print("killing", flush=True)
        time.sleep(600)

    real, files.save_file = files.save_file, half_written
    if where == "edit":
        files.save_file = real
        m.apply(Edit("zero_then_hang", {}))
    else:
        m.apply(scale_edit(r"attn1\.to_q\.weight", 2.0))
""")


def kill_during(where: str, folder) -> str:
    """Run a studio process, SIGKILL it mid-edit or mid-save; returns the fingerprint it had after edit 1."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED, where, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        fingerprint = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == "killing"
    finally:
        proc.kill()
        proc.wait(30)
    return fingerprint


def test_a_kill_mid_edit_or_mid_save_brings_back_the_last_completed_state(tmp_path):
    for where in ("edit", "save"):
        folder = tmp_path / where
        fingerprint = kill_during(where, folder)
        m = PipelineManager("builtin", device="cpu", history_dir=folder)
        assert rows(m) == [("scale /attn2\\.to_v\\.weight/ x0.5", True)], where
        assert m.fingerprint() == fingerprint, where
        m.undo()
        assert m.fingerprint() == PipelineManager("builtin", device="cpu").fingerprint()
