"""History panel, visible from every tab: the edit stack, undo/redo/reset, save/load, before/after."""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio import steering
from studio.manager import PipelineManager

from .common import GPU, number, progress_reporter, toast, user_errors
from .generate_tab import request_from

COLUMNS = ["#", "edit", "kind", "parameters", "applied"]


def history_view(manager: PipelineManager):
    """Rows of the stack and a one-line model state (description and fingerprint)."""
    rows = [[r["index"], r["edit"], r["kind"], r["params"], "✓" if r["applied"] else "undone"] for r in manager.history()]
    applied = manager.stack.position
    acting = steering.describe(manager.pipe)
    state = (f"**Model:** {manager.describe()}  \n**State:** {applied} of {len(rows)} edits applied · "
             f"fingerprint `{manager.fingerprint(cached=True)[:12]}`"
             + (f"  \n**Acting on every generation:** {toast('; '.join(acting))}" if acting else "")
             + (f"  \n⚠ **{toast(manager.history_warning)}**" if manager.history_warning else ""))
    return rows, state


def undo(manager: PipelineManager) -> None:
    if manager.undo() is None:
        gr.Info("Nothing to undo.")


def redo(manager: PipelineManager) -> None:
    if manager.redo() is None:
        gr.Info("Nothing to redo.")


def save(manager: PipelineManager) -> str:
    path = Path(tempfile.mkdtemp(prefix="concept-studio-")) / "edits.safetensors"
    return str(manager.save_edits(path))


def load(manager: PipelineManager, file) -> None:
    if not file:
        raise gr.Error("Choose an edit file (.safetensors) first.")
    for note in manager.load_edits(file):
        gr.Info(toast(note))


def compare(manager: PipelineManager, index, *settings, progress=None):
    request = request_from(*settings)
    request.batch = 1
    before, after = manager.compare(request, int(index) if index else None, progress)
    return (before.images[0], after.images[0])


def build(manager: PipelineManager, settings: list) -> SimpleNamespace:
    gr.Markdown("### History")
    state = gr.Markdown()
    table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, wrap=True, label="Edits (oldest first)")
    with gr.Row():
        undo_btn = gr.Button("↶ Undo", size="sm")
        redo_btn = gr.Button("↷ Redo", size="sm")
        reset_btn = gr.Button("Reset to original", size="sm", variant="stop")
    with gr.Row():
        toggle_index = number(label="Edit #", precision=0, value=1, minimum=1, scale=1)
        toggle_btn = gr.Button("Switch on / off", size="sm", scale=2)
    with gr.Accordion("Save / load edits", open=False):
        save_btn = gr.Button("Save applied edits", size="sm")
        saved = gr.File(label="Edit file", interactive=False)
        upload = gr.File(label="Load an edit file", file_types=[".safetensors"], type="filepath")
    with gr.Accordion("Before / after (same seed)", open=True):
        index = number(label="Edit # (0: the latest applied)", precision=0, value=0, minimum=0)
        compare_btn = gr.Button("Compare", size="sm")
        slider = gr.ImageSlider(label="before ↔ after", type="pil")

    outputs = [table, state]
    refresh = lambda: history_view(manager)  # noqa: E731
    ns = SimpleNamespace(outputs=outputs, refresh=refresh)
    ns.follow = lambda event: event.success(refresh, None, outputs, show_progress="hidden")

    actions = ((undo_btn, lambda: undo(manager), "undo"), (redo_btn, lambda: redo(manager), "redo"),
               (reset_btn, manager.reset, "reset"))
    for button, fn, name in actions:
        ns.follow(button.click(user_errors(fn), None, None, api_name=name, **GPU))
    ns.follow(toggle_btn.click(user_errors(lambda i: manager.toggle(int(i)) and None), toggle_index, None,
                               api_name="toggle", **GPU))
    save_btn.click(user_errors(lambda: save(manager)), None, saved, api_name="save_edits", **GPU)
    ns.follow(upload.upload(user_errors(lambda f: load(manager, f)), upload, None, api_name="load_edits", **GPU))

    @user_errors
    def on_compare(i, *values, progress=gr.Progress()):
        return compare(manager, i, *values, progress=progress_reporter(progress, "before / after"))

    compare_btn.click(on_compare, [index, *settings], slider, api_name="compare", **GPU)
    return ns
