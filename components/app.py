"""The studio's Gradio app: tabs on the left, the History panel on the right, one GPU queue."""
from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.manager import PipelineManager

from . import attention_tab, customize_tab, erase_tab, extract_tab, generate_tab, history_panel
from .common import toast

CSS_PATH = Path(__file__).resolve().parent.parent / "assets" / "studio.css"
TOY_NOTE = ("> **Toy-world model** (64×64, trained here from scratch). It knows the shapes circle, square, "
            "triangle, star; the colours red, green, blue, yellow, purple, orange (and crimson, scarlet, azure); the "
            "styles solid, striped, dotted, outlined; positions left/right/top/bottom. Try *a striped blue star* "
            "or *a red circle and a yellow square*. It has never seen a heart or a cross.")


def build_app(manager: PipelineManager, sam=None) -> gr.Blocks:
    """The whole UI; `sam` (studio.extract.sam.SamMasks) lets the Extract tab turn clicks into masks."""
    manager.pipe  # load before the first request, so the page shows the model at once
    with gr.Blocks(title="Concept Studio") as demo:
        gr.Markdown("# Concept Studio\nEdit what a text-to-image model knows. Every edit can be undone exactly.")
        if manager.info.kind == "builtin-toy":
            gr.Markdown(TOY_NOTE, elem_classes="demo-note")
        if manager.restore_notes:
            gr.Markdown("> **Last session:** " + toast(manager.restore_notes[0]) + ".", elem_classes="demo-note")
        if manager.info.is_demo:
            gr.Markdown("> **Demo model:** random weights built from configs; it knows nothing, so images look "
                        "like noise. Load a real model with `--model`.", elem_classes="demo-note")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Generate"):
                        gen = generate_tab.build(manager)
                    with gr.Tab("Erase"):
                        erase = erase_tab.build(manager)
                    with gr.Tab("Customize"):
                        customize = customize_tab.build(manager)
                    with gr.Tab("Extract"):
                        extract = extract_tab.build(manager, sam)
                    with gr.Tab("Attention"):
                        attention_tab.build(manager)
            with gr.Column(scale=2, min_width=340, elem_classes="history"):
                history = history_panel.build(manager, gen.settings)
        for event in gen.edit_events + erase.edit_events + customize.edit_events + extract.edit_events:
            history.follow(event)
        demo.load(history.refresh, None, history.outputs)
    return demo


def launch(manager: PipelineManager, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, block: bool = True, sam=None, max_upload: str | int = "200mb") -> gr.Blocks:
    """Serve the app; loopback only unless a host or a share link is asked for. Gradio serves only the
    files the app made or was sent (no other path), and the monitoring endpoint stays off."""
    demo = build_app(manager, sam)
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host, server_port=port, share=share, auth=auth, max_file_size=max_upload,
        enable_monitoring=False, show_error=True, prevent_thread_lock=not block, quiet=not block,
        css_paths=[CSS_PATH] if CSS_PATH.is_file() else None, footer_links=["api", "settings"],
    )
    return demo
