"""The headless CLI: generate, scale into an edit file, list it, re-apply it with a before/after."""
import numpy as np
import pytest
from PIL import Image

from studio.cli import main


def test_cli_generate_scale_history_compare(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle", "--seed", "5", "--steps", "4", "--batch", "2",
                 "--out", str(tmp_path / "batch"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "batch").iterdir()) == ["seed5.png", "seed6.png"]
    assert main(["generate", "--prompt", "a red circle", "--seed", "5", "--steps", "4", "--out", str(tmp_path / "plain")]) == 0
    edits = tmp_path / "edits.safetensors"
    assert main(["scale", "--pattern", r"attn2\.to_v\.weight", "--factor", "0", "--save", str(edits)]) == 0
    assert main(["history", str(edits)]) == 0
    assert "kind=scale" in capsys.readouterr().out
    assert main(["generate", "--prompt", "a red circle", "--seed", "5", "--steps", "4", "--edits", str(edits),
                 "--compare", "--out", str(tmp_path / "cmp")]) == 0
    before = np.asarray(Image.open(tmp_path / "cmp" / "seed5-before.png"))
    after = np.asarray(Image.open(tmp_path / "cmp" / "seed5-after.png"))
    plain = np.asarray(Image.open(tmp_path / "plain" / "seed5.png"))
    assert np.array_equal(before, plain) and not np.array_equal(before, after)


def test_cli_erase_saves_an_edit_that_reapplies_and_exports_a_lora(tmp_path, capsys):
    edits, lora = tmp_path / "erase.safetensors", tmp_path / "lora.safetensors"
    assert main(["erase", "red", "--preserve", "green,blue", "--templates", "toy", "--rece", "1", "--device", "cpu",
                 "--save", str(edits), "--export-lora", str(lora)]) == 0
    out = capsys.readouterr().out
    assert "UCE+RECE" in out and "relative error" in out and lora.stat().st_size > 0
    assert main(["history", str(edits)]) == 0
    assert "kind=erase_closed_form" in capsys.readouterr().out
    assert main(["generate", "--prompt", "a red circle", "--steps", "4", "--edits", str(edits), "--compare",
                 "--out", str(tmp_path / "cmp")]) == 0
    assert "re-applied exactly" in capsys.readouterr().err


def test_cli_customize_trains_saves_exports_and_imports_exactly(tmp_path, capsys):
    out, edits, exported = tmp_path / "imgs", tmp_path / "heart.safetensors", tmp_path / "exported"
    assert main(["customize", "--toy-example", "heart", "--token", "<heart>", "--steps", "3", "--batch", "2",
                 "--prior-images", "2",
                 "--device", "cpu", "--prompt", "a red <heart>", "--out", str(out / "trained"), "--save", str(edits),
                 "--export", str(exported)]) == 0
    text = capsys.readouterr().out
    assert "learn <heart> (lora)" in text and "exported embedding" in text and "exported lora" in text
    assert main(["history", str(edits)]) == 0 and "kind=learned_concept" in capsys.readouterr().out
    assert main(["customize", "--import", str(exported / "heart.safetensors"), str(exported / "heart-lora.safetensors"),
                 "--device", "cpu", "--prompt", "a red <heart>", "--out", str(out / "imported")]) == 0
    for j in range(4):
        assert np.array_equal(np.asarray(Image.open(out / "trained" / f"concept-0-{j}.png")),
                              np.asarray(Image.open(out / "imported" / f"concept-0-{j}.png")))


def test_cli_composes_by_regions_with_a_collage(tmp_path, capsys):
    assert main(["generate", "--prompt", "a red circle and a blue square", "--steps", "10", "--region",
                 "red circle=0,0,0.5,1", "--region", "blue square=0.5,0,1,1", "--collage", "0.2",
                 "--out", str(tmp_path)]) == 0
    assert "collage redrawn 20%" in capsys.readouterr().err
    image = np.asarray(Image.open(tmp_path / "seed0.png")).astype(int)
    red = np.abs(image - [214, 39, 40]).sum(-1) < 90
    blue = np.abs(image - [31, 90, 220]).sum(-1) < 90
    assert red[:, :24].sum() > 30 > red[:, 40:].sum() and blue[:, 40:].sum() > 30 > blue[:, :24].sum()


@pytest.mark.parametrize("argv,message", [
    (["customize", "--toy-example", "heart"], "--token is required"),
    (["customize", "--token", "red", "--toy-example", "heart"], "already a word"),
    (["erase", "red", "--guide", "red"], "toward itself"),
    (["--model", "model.ckpt"], "allow-pickle"),
    (["generate", "--prompt", "x", "--width", "63", "--out", "unused"], "multiple of 8"),
    (["--auth", "nopassword"], "user:password"),
    (["generate", "--prompt", "x", "--region", "red 0,0,1,1", "--out", "unused"], "WORDS=x0,y0,x1,y1"),
    (["generate", "--prompt", "x", "--collage", "0.2", "--out", "unused"], "needs --region"),
])
def test_cli_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model.ckpt").write_bytes(b"x")
    assert main(argv) == 2
    assert message in capsys.readouterr().err
