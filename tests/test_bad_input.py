"""Bad input across every tab, sent as a browser or a script would (raw JSON, NaN included): each case
ends in a clear message, and the model and its history are exactly as before."""
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image

LONG = "a red circle " * 60  # 180 tokens; the text encoder reads 75
WORDS = "un cercle rouge 🔴 — 赤い円"
NAN = float("nan")
HTML = ("page.html", b"<script>alert(1)</script>")


def png(size=(64, 64), colour=(255, 255, 255)) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return f"{size[0]}x{size[1]}.png", buffer.getvalue()


class Api:
    """Calls an endpoint the way the page does: its defaults, with some inputs replaced."""

    def __init__(self, url: str):
        self.url = url
        info = httpx.get(url + "gradio_api/info").json()["named_endpoints"]
        self.defaults = {name.strip("/"): [p.get("parameter_default") for p in e["parameters"]] for name, e in info.items()}

    def upload(self, *files) -> list[dict]:
        paths = httpx.post(self.url + "gradio_api/upload", files=[("files", f) for f in files]).json()
        return [{"path": p, "meta": {"_type": "gradio.FileData"}} for p in paths]

    def call(self, api: str, **changes) -> tuple[str, str]:
        """('error' or 'complete', the message or the output as text)."""
        data = list(self.defaults[api])
        for index, value in changes.items():
            data[int(index.strip("_"))] = value
        body = json.dumps({"data": data}, allow_nan=True)  # NaN goes out as JavaScript's NaN
        event = httpx.post(self.url + f"gradio_api/call/{api}", content=body,
                           headers={"content-type": "application/json"}).json()["event_id"]
        stream = httpx.get(self.url + f"gradio_api/call/{api}/{event}", timeout=300).text
        kind = [line.split(": ", 1)[1] for line in stream.splitlines() if line.startswith("event: ")][-1]
        last = [line[6:] for line in stream.splitlines() if line.startswith("data: ")][-1]
        return kind, (json.loads(last) or {}).get("error", "") if kind == "error" else last


@pytest.fixture
def api(served):
    manager, client = served
    before = manager.fingerprint(), manager.history()
    yield Api(client.src)
    assert (manager.fingerprint(), manager.history()) == before, "a bad input changed the model or its history"


def check(api: Api, cases: list) -> None:
    """Each case (api, changes, regex): an error whose message matches, or for regex 'ok:…' an output that does."""
    import re

    wrong = []
    for name, changes, expected in cases:
        kind, message = api.call(name, **changes)
        ok = expected.startswith("ok:")
        if (kind == "complete") != ok or not re.search(expected.removeprefix("ok:"), message or "", re.I):
            wrong.append(f"/{name} {changes}: expected {expected!r}, got {kind}: {message[:300]!r}")
    assert not wrong, "\n".join(wrong)


def test_generate_tab(api):
    check(api, [
        ("generate", dict(_0="", _3=2, _7=1), "ok:1 image"),  # an empty prompt is a valid (unconditional) prompt
        ("generate", dict(_0=WORDS, _3=2, _7=1), "ok:1 image"),
        ("generate", dict(_0=LONG, _3=2, _7=1), "ok:truncated"),
        ("generate", dict(_3=NAN), "steps: got nan; enter a finite number"),
        ("generate", dict(_4=NAN), "guidance scale: got nan"),
        ("generate", dict(_5=10**9), "width 1000000000 is outside"),
        ("generate", dict(_5=None, _6=None, _3=2, _7=1), "ok:1 image"),  # cleared boxes: the model's size
        ("generate", dict(_2=[1, 2]), "seed must be a whole number"),
        ("generate", dict(_2="🔴"), "seed must be a whole number"),
        ("generate", dict(_7=10**6), "greater than maximum"),
        ("generate", dict(_8="Nope"), "Nope"),
        ("apply_scale", dict(_1=NAN), "finite number"),
        ("apply_scale", dict(_0="("), "regular expression|pattern"),
        ("apply_scale", dict(_0=""), "no parameter name matches"),
    ])


def test_erase_tab(api):
    check(api, [
        ("erase", dict(_1=""), "at least one concept"),
        ("erase", dict(_1=" , ,"), "at least one concept"),
        ("erase", dict(_6=NAN), "finite number"),
        ("erase", dict(_1="🔴", _2="🔴"), "toward itself"),
        ("erase", dict(_1="red", _3="red"), "both erased and preserved"),
        ("erase", dict(_1=LONG), "too long|tokens"),
        ("erase", dict(_0="Fine-tuned LoRA (ESD)", _15=NAN), "steps|whole number"),
        ("erase", dict(_0="Something else"), "Something else"),
        ("erase_report", dict(), "no applied edit"),
        ("export", dict(), "no .*edit|nothing"),
    ])


def test_customize_tab(api):
    three = api.upload(*[png(colour=(200, 30, 30))] * 3)
    train = dict(_4=1)  # one step: if a bad input slipped through, the test would see the edit
    check(api, [
        ("customize_train", dict(_0=[], **train), "at least 3"),
        ("customize_train", dict(_0=three[:2], **train), "at least 3"),
        ("customize_train", dict(_0=api.upload(HTML, HTML, HTML), **train), "Invalid file type"),
        ("customize_train", dict(_0=three, _1="red"), "already a word|known word"),
        ("customize_train", dict(_0=three, _1=""), "token"),
        ("customize_train", dict(_0=three, _1=LONG), "token"),
        ("customize_train", dict(_0=three, _4=NAN), "steps"),
        ("customize_train", dict(_0=three, _5=NAN, **train), "learning rate|finite"),
        ("customize_train", dict(_0=three, _4=-5), "steps"),
        ("compose", dict(), "at least two"),
        ("t2i_zero", dict(_0=""), "at least two"),
        ("concept_import", dict(_0=[], _1=""), "no files"),
        ("concept_import", dict(_0=api.upload(("x.safetensors", b"garbage")), _1=""), "safetensors|read"),
        ("concept_export", dict(), "exactly one"),
    ])


def test_extract_tab(api):
    blank = api.upload(png())[0]
    check(api, [
        ("find_concepts", dict(_0=None), "upload an image"),
        ("find_concepts", dict(_0=api.upload(HTML)[0]), "cannot identify|not an image"),
        ("find_concepts", dict(_0=api.upload(png((4, 4)))[0]), "too small|at least"),
        ("find_concepts", dict(_0=blank, _1=NAN), "how many.*got nan"),
        ("extract", dict(_0=None), "upload an image"),
        ("extract", dict(_0=blank), "mask"),
        ("segment", dict(_0=blank), "click"),
    ])


def test_attention_tab(api):
    check(api, [
        ("attention_run", dict(_1="", _4=2), "prompt|empty"),
        ("attention_run", dict(_1=LONG, _4=2), "ok:truncated|tokens"),
        ("attention_run", dict(_1=WORDS, _4=2), "ok:2 steps"),
        ("attention_run", dict(_4=NAN), "steps"),
        ("attention_run", dict(_0="Analyse an image", _10=None), "no image|upload"),
        ("attention_run", dict(_0="Analyse an image", _10=api.upload(HTML)[0]), "cannot identify|not an image"),
        ("attention_run", dict(_3="x"), "seed must be"),
    ])


def test_history_panel(api):
    check(api, [
        ("toggle", dict(_0=99), "not applied"),
        ("toggle", dict(_0=NAN), "edit|number|whole"),
        ("compare", dict(_0=NAN), "edit|number|whole"),
        ("compare", dict(_0=3), "no edit to compare"),
        ("load_edits", dict(_0=None), "Choose an edit file"),
        ("load_edits", dict(_0=api.upload(HTML)[0]), "Invalid file type"),
        ("load_edits", dict(_0=api.upload(("edits.safetensors", b"\x00" * 64))[0]), "not a readable"),
        ("undo", dict(), "ok:"),
        ("redo", dict(), "ok:"),
        ("save_edits", dict(), "no applied edits"),
    ])
