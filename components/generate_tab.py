"""Generate tab: prompt, seed and settings in; a gallery out; progress and a stop button."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from studio import models
from studio.generation import MAX_BATCH, MAX_STEPS, SAMPLERS, GenerationRequest
from studio.layer_scale import scale_edit
from studio.manager import PipelineManager

from .common import GPU, number, progress_reporter, slider, stop_own_job, toast, user_errors

LAYER_PATTERNS = [r"attn2\.to_v\.weight", r"attn2\.to_k\.weight", r"unet\.mid_block\..*attn2", r"text_encoder\..*layers\.2\."]


def request_from(prompt, negative, seed, steps, guidance, width, height, batch, sampler) -> GenerationRequest:
    return GenerationRequest(prompt, negative, seed, steps, guidance, width, height, batch, sampler)


def generate(manager: PipelineManager, *settings, progress=None):
    """Run one generation; returns gallery items [(image, caption)] and a status line."""
    result = manager.generate(request_from(*settings), progress)
    for w in result.warnings:
        gr.Warning(toast(w))
    gallery = [(im, f"seed {s}") for im, s in zip(result.images, result.seeds)]
    status = f"{len(result.images)} image(s) in {result.seconds:.2f} s · seeds {', '.join(map(str, result.seeds))}"
    return gallery, "\n\n".join([status] + [f"⚠ {w}" for w in result.warnings])


def apply_scale(manager: PipelineManager, pattern: str, factor: float) -> str:
    entry = manager.apply(scale_edit(pattern, factor))
    return f"Applied: {entry.edit.title} ({len(entry.patch.originals)} tensors)"


def build(manager: PipelineManager) -> SimpleNamespace:
    size = models.of(manager.pipe).default_size
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value="a red circle", lines=2)
            negative = gr.Textbox(label="Negative prompt", lines=1)
            with gr.Row():
                seed = gr.Textbox(label="Seed (-1: random)", value="0", max_lines=1)
                batch = slider(1, MAX_BATCH, value=4, step=1, label="Batch")
            with gr.Accordion("Settings", open=False):
                sampler = gr.Dropdown(list(SAMPLERS), value="DPM++ 2M", label="Sampler")
                steps = slider(1, MAX_STEPS, value=20, step=1, label="Steps")
                guidance = slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
                with gr.Row():
                    width = number(label="Width", value=size, precision=0)
                    height = number(label="Height", value=size, precision=0)
            with gr.Row():
                run = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=4, height="auto", object_fit="contain", format="png")
            status = gr.Markdown()
    with gr.Accordion("Weight edit: scale layers (undoable)", open=False):
        gr.Markdown("Multiply every parameter whose name matches a regular expression. "
                    "It lands in the History panel like any other edit.")
        with gr.Row():
            pattern = gr.Dropdown(LAYER_PATTERNS, value=LAYER_PATTERNS[0], allow_custom_value=True, label="Parameter pattern")
            factor = slider(-2, 2, value=0.0, step=0.05, label="Factor")
            apply = gr.Button("Apply edit")
        edit_status = gr.Markdown()

    settings = [prompt, negative, seed, steps, guidance, width, height, batch, sampler]

    @user_errors
    def on_generate(*values, progress=gr.Progress()):
        return generate(manager, *values, progress=progress_reporter(progress, "denoising"))

    gen_event = gr.on([run.click, prompt.submit], on_generate, settings, [gallery, status], api_name="generate", **GPU)
    stop.click(stop_own_job(manager), None, None, api_name="stop", queue=False)
    apply_event = apply.click(user_errors(lambda p, f: apply_scale(manager, p, f)), [pattern, factor], edit_status,
                              api_name="apply_scale", **GPU)
    return SimpleNamespace(settings=settings, edit_events=[apply_event], gen_event=gen_event)
