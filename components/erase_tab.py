"""Erasure tab: what to erase, what it becomes, what to keep; a method; a before/after report; export."""
from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from studio.erase import esd
from studio.erase.closed_form import DEFAULTS as CF
from studio.erase.closed_form import erase_edit
from studio.erase.guard import DEFAULTS as GUARD
from studio.erase.guard import guard_edit
from studio.errors import StudioError
from studio.lora_export import export_lora, export_pipeline
from studio.manager import PipelineManager
from studio.toyworld.presets import erasure_report, is_toy, toy_captions

from .common import GPU, number, progress_reporter, slider, stop_own_job, stream_job, user_errors

METHODS = ["Closed form (UCE)", "Inference guard (SAFREE-like)", "Fine-tuned LoRA (ESD)"]
GUARD_NOTE = ("The guard changes no weights: it cleans prompt embeddings at generation time, switches on and off "
              "instantly, and anyone holding the weights or the code can bypass it.")


def words(text: str) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def erase(manager: PipelineManager, method, concepts, guide, preserve, templates, tokens, lam, erase_scale,
          preserve_scale, rece_rounds, rece_lambda, neighbours, threshold, esd_method, rank, steps, lr, eta,
          strength=1.0, captions="", preview=None, progress=None):
    """Build the chosen edit and put it on the stack; returns a status line."""
    erase_list, keep = words(concepts), words(preserve)
    if not erase_list:
        raise StudioError("type at least one concept to erase (comma-separated for several)")
    if method == METHODS[0]:
        edit = erase_edit(erase_list, guide=guide or "", preserve=keep, templates=templates, tokens=tokens,
                          lam=float(lam), erase_scale=float(erase_scale), preserve_scale=float(preserve_scale),
                          rece_rounds=int(rece_rounds), rece_lambda=float(rece_lambda), neighbours=int(neighbours))
    elif method == METHODS[1]:
        edit = guard_edit(erase_list, templates=templates, threshold=float(threshold))
    elif method == METHODS[2]:
        if len(erase_list) > 1:
            raise StudioError("the fine-tuned method erases one concept at a time: stack several edits")
        captions = [c.strip() for c in (captions or "").splitlines() if c.strip()]
        if not captions and is_toy(manager):
            captions = toy_captions(erase_list[0])
        edit = esd.train_esd(manager, erase_list[0], method=esd_method, rank=int(rank), steps=int(steps),
                             lr=float(lr) if lr else None, eta=float(eta), concept_prompts=captions or None,
                             progress=progress,
                             preview=preview and (lambda step, images: preview(images)))
        if float(strength) != 1.0:
            edit = esd.with_strength(edit, float(strength))
    else:
        raise StudioError(f"unknown method {method!r}")
    entry = manager.apply(edit)
    return f"Applied: **{entry.edit.title}** ({len(entry.patch.originals)} tensors changed)" + (
        f"\n\n{GUARD_NOTE}" if method == METHODS[1] else "")


def report(manager: PipelineManager, concepts, preserve, seeds, progress=None):
    r = erasure_report(manager, words(concepts), words(preserve), seeds=int(seeds), progress=progress)
    rows = [[s["group"], s["prompts"], f"{s['before']:.0%}", f"{s['after']:.0%}"] for s in r.summary()]
    return r.grid, rows, (r.chart() if r.rows else None), "\n\n".join(r.notes) or "Oracle-measured presence (toy world)."


def export(manager: PipelineManager, what: str, rank: int):
    out = Path(tempfile.mkdtemp(prefix="studio-export-"))
    if what == "LoRA (kohya keys)":
        rep = export_lora(manager, out / "erasure-lora.safetensors", rank=int(rank))
        return str(rep["path"]), f"LoRA rank {rep['rank']}: relative reconstruction error {rep['error']:.2e}"
    folder = export_pipeline(manager, out / "edited-pipeline")
    return None, f"Full edited pipeline saved to `{folder}` (load it with `--model {folder}`)"


def build(manager: PipelineManager) -> SimpleNamespace:
    toy = manager.info.kind == "builtin-toy"
    with gr.Row():
        with gr.Column(scale=2):
            concepts = gr.Textbox(label="Erase (comma-separated)", value="red" if toy else "",
                                  placeholder="e.g. Van Gogh, red, striped")
            guide = gr.Textbox(label="…so that it becomes (guide)", value="",
                               placeholder="empty: nothing in particular; 'art' suits styles")
            preserve = gr.Textbox(label="Preserve (comma-separated)",
                                  value="green, blue, yellow, purple, orange" if toy else "")
            method = gr.Radio(METHODS, value=METHODS[0], label="Method")
            with gr.Accordion("Closed-form settings", open=False):
                templates = gr.Dropdown(["toy", "object", "style", "none"], value="toy" if toy else "object",
                                        label="Prompt templates")
                tokens = gr.Radio(["to_end", "word"], value=CF["tokens"], label="Token vectors")
                lam = slider(0.01, 5, value=CF["lam"], label="λ (keep the original)")
                erase_scale = slider(0, 5, value=CF["erase_scale"], label="Erase scale")
                preserve_scale = slider(0, 5, value=CF["preserve_scale"], label="Preserve scale")
                rece_rounds = slider(0, 3, value=0, step=1, label="RECE hardening rounds")
                rece_lambda = number(value=CF["rece_lambda"], label="RECE λ (1e-3 styles/objects, 0.1 nudity)")
                neighbours = slider(0, 16, value=0, step=1, label="RealEra neighbour samples per vector (experimental: undid the erasure on the toy model)")
            with gr.Accordion("Guard settings", open=False):
                gr.Markdown(GUARD_NOTE)
                threshold = slider(0.3, 1.5, value=GUARD["threshold"], label="Trigger threshold (× the concept word's own score)")
            with gr.Accordion("Fine-tuning settings", open=False):
                esd_method = gr.Radio(list(esd.METHODS), value="esd-x", label="Objective",
                                      info="; ".join(f"{k}: {v}" for k, v in esd.METHODS.items()))
                rank = slider(1, esd.MAX_RANK, value=2, step=1, label="LoRA rank")
                steps = slider(10, 1000, value=200, step=10, label="Steps")
                lr = number(value=esd.suggested_lr(manager.pipe),
                               label=f"Learning rate (LoRA; published full-weight ESD: {esd.PUBLISHED_LR})")
                eta = slider(0, 5, value=2.0, label="η (negative guidance)")
                strength = slider(0, 2, value=1.0, step=0.05, label="Adapter strength")
                captions = gr.Textbox(label="Training captions with the concept (one per line, optional)", lines=3,
                                      placeholder="the toy world fills these in: a red circle, a red square, …")
            with gr.Row():
                run = gr.Button("Erase", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            with gr.Row():
                seeds = slider(1, 8, value=4, step=1, label="Report seeds")
                rerun = gr.Button("Report on the latest edit")
            with gr.Accordion("Export", open=False):
                what = gr.Radio(["LoRA (kohya keys)", "Full pipeline"], value="LoRA (kohya keys)", label="Export")
                export_rank = slider(1, 128, value=4, step=1, label="LoRA rank")
                export_btn = gr.Button("Export")
                export_file = gr.File(label="Download")
                export_status = gr.Markdown()
        with gr.Column(scale=3):
            status = gr.Markdown()
            grid = gr.Gallery(label="Before / after (seed 0)", columns=4, height="auto", format="png")
            scores = gr.Dataframe(headers=["group", "prompts", "before", "after"], label="Measured presence",
                                  interactive=False)
            chart = gr.Plot(label="Before vs after")
            note = gr.Markdown()

    settings = [method, concepts, guide, preserve, templates, tokens, lam, erase_scale, preserve_scale,
                rece_rounds, rece_lambda, neighbours, threshold, esd_method, rank, steps, lr, eta, strength, captions]

    @user_errors
    def on_erase(*values, progress=gr.Progress()):
        job = lambda preview, tick: erase(manager, *values, preview=preview, progress=tick)  # noqa: E731
        for previews, result in stream_job(job, progress, "training"):
            yield (result if result is not None else "Training… (previews below)"), previews

    @user_errors
    def on_report(concepts_, preserve_, seeds_, progress=gr.Progress()):
        return report(manager, concepts_, preserve_, seeds_, progress_reporter(progress, "before/after"))

    erase_event = run.click(on_erase, settings, [status, grid], api_name="erase", **GPU)
    erase_event.success(on_report, [concepts, preserve, seeds], [grid, scores, chart, note], **GPU)
    rerun.click(on_report, [concepts, preserve, seeds], [grid, scores, chart, note], api_name="erase_report", **GPU)
    stop.click(stop_own_job(manager), None, None, queue=False)
    export_btn.click(user_errors(lambda w, r: export(manager, w, r)), [what, export_rank],
                     [export_file, export_status], api_name="export", **GPU)
    return SimpleNamespace(edit_events=[erase_event])
