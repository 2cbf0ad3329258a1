"""Attention tab: where each word of the prompt attended, for a generated or an uploaded image.

Run (GPU queue) captures once; every display control redraws from the cached result on the CPU,
so sliders never wait for the model. Click the image for a pixel's self-attention. Guidance
(Attend-and-Excite, A-STAR) and token reweighting run on the same seed as a plain run to compare.
Wiring: inside `with gr.Tab("Attention"):` call `build(manager)`; it returns a SimpleNamespace.
"""
from __future__ import annotations

import tempfile
from types import SimpleNamespace

import gradio as gr
from PIL import Image, ImageDraw

from studio.attention.any_image import DEFAULT_TIMESTEP, image_maps
from studio.attention.control import (
    Control,
    default_resolution,
    default_scale_factor,
    parse_thresholds,
    parse_weights,
)
from studio.attention.export import export
from studio.attention.maps import BLOCKS, NORMALIZATIONS, Selection
from studio.attention.render import COLORMAPS, colorize
from studio.attention.result import ResultCache
from studio.attention.run import CaptureOptions, compare_control, generate_with_maps
from studio.attention.selfattn import components, pixel_row
from studio.attention.view import View, render_view
from studio import models
from studio.generation import MAX_STEPS, SAMPLERS, GenerationRequest
from studio.manager import PipelineManager

from .common import GPU, number, progress_reporter, slider, stop_own_job, toast, user_errors

DISPLAY = 256
MODES = ("Generate", "Analyse an image")
SUMMARY_COLUMNS = ["word", "tokens", "peak", "peak at (x, y)", "area ≥ τ", "retention", "max overlap", "with"]


# -- handlers: plain functions of the manager and the cache, callable from tests ---------------------
def run(manager: PipelineManager, cache: ResultCache, mode, prompt, negative, seed, steps, guidance, sampler,
        per_step, heads, self_step, image, timestep, repeats, method, subjects, scale_factor, max_iter,
        thresholds, resolution, reweight, compare, progress=None):
    """Capture (and guide); returns (key, baseline key or None, status markdown)."""
    if mode == MODES[1]:
        result = image_maps(manager, image, prompt, timestep, seed, negative, repeats, bool(heads))
        t = result.settings["timestep"]
        return cache.put(result), None, f"Maps of an uploaded image at t={t} in {result.seconds:.2f} s"
    control = Control(method or "none", [w.strip() for w in str(subjects or "").split(",") if w.strip()],
                      float(scale_factor), parse_thresholds(thresholds), int(max_iter), resolution=int(resolution),
                      reweight=parse_weights(reweight))
    request = GenerationRequest(prompt, negative, seed, steps, guidance, sampler=sampler)
    options = CaptureOptions(per_step=bool(per_step), heads=bool(heads),
                             self_step=None if self_step in (None, "") or int(self_step) < 0 else int(self_step))
    if control.active and compare:
        base, result = compare_control(manager, request, control, options, progress)
        base_key = cache.put(base)
    else:
        result, base_key = generate_with_maps(manager, request, options, control if control.active else None,
                                              progress), None
    for w in result.warnings:
        gr.Warning(toast(w))
    status = f"seed {result.seeds[0]} · {result.steps} steps · {result.seconds:.2f} s"
    if result.control_log:
        first, last = result.control_log[0], result.control_log[-1]
        status += (f" · {control.method}: loss {first['loss'][0]:.3f} → {last['loss'][0]:.3f} over "
                   f"{len(result.control_log)} updates")
    if base_key:
        status += " · left: without control, same seed"
    return cache.put(result), base_key, "\n\n".join([status] + [f"⚠ {w}" for w in result.warnings])


def view_from(words, special, branch, resolutions, blocks, head, step_from, step_to, scrub, cmap, alpha,
              normalization, tau, outline) -> View:
    steps = None
    if scrub is not None and int(scrub) >= 0:
        steps = (int(scrub), int(scrub))
    elif step_from is not None and step_to is not None:
        steps = (int(min(step_from, step_to)), int(max(step_from, step_to)))
    sel = Selection(tuple(int(r) for r in resolutions) if resolutions else None, tuple(blocks or BLOCKS),
                    None if head in (None, "", "mean") else int(head), steps,
                    "negative" if branch == "negative" else "prompt")
    return View(words or None, bool(special), sel, normalization, float(tau), bool(outline), cmap, float(alpha))


def _fit_steps(view: View, result) -> View:
    """A step range beyond this result (e.g. from a longer earlier run) falls back to every step."""
    s = view.selection.steps
    if s is not None and (result.mode == "image" or s == (0, result.steps - 1) or s[1] >= result.steps):
        view.selection = Selection(view.selection.resolutions, view.selection.blocks, view.selection.head, None,
                                   view.selection.branch)
    return view


def render(cache: ResultCache, key, base_key, *view_args):
    """Gallery items, the summary table and the baseline's gallery (same view)."""
    result = cache.get(key)
    view = _fit_steps(view_from(*view_args), result)
    shown = render_view(result, view)
    rows = [[r["word"], " ".join(map(str, r["tokens"])), round(r["peak"], 4), str(tuple(r["peak_at"])),
             round(r["area"], 3), None if r["retention"] is None else round(r["retention"], 3),
             None if r["max_overlap"] is None else round(r["max_overlap"], 3), r["overlaps_most_with"] or ""]
            for r in shown.summary["rows"]]
    base = []
    if base_key:
        b = cache.get(base_key)
        base = render_view(b, _fit_steps(view_from(*view_args), b)).tiles
    return shown.tiles, rows, base


def display_image(cache: ResultCache, key, mark=None) -> Image.Image:
    result = cache.get(key)
    im = result.images[0].convert("RGB").resize((DISPLAY, DISPLAY), Image.BICUBIC)
    if mark is not None:
        x, y = mark
        d = ImageDraw.Draw(im)
        d.ellipse((x - 6, y - 6, x + 6, y + 6), outline=(255, 255, 255), width=2)
        d.ellipse((x - 8, y - 8, x + 8, y + 8), outline=(0, 0, 0), width=1)
    return im


def click(cache: ResultCache, key, index, resolutions, blocks, head, cmap):
    """Self-attention of the clicked display pixel: (marked image, heat map image)."""
    x, y = (int(index[0]), int(index[1])) if index else (DISPLAY // 2, DISPLAY // 2)
    result = cache.get(key)
    h, w = result.size
    row = pixel_row(result, x * w / DISPLAY, y * h / DISPLAY,
                    resolutions=tuple(int(r) for r in resolutions) if resolutions else None,
                    blocks=tuple(blocks or BLOCKS), head=None if head in (None, "", "mean") else int(head))
    heat = colorize((row / row.max().clamp_min(1e-12)).numpy(), cmap)
    return display_image(cache, key, (x, y)), Image.fromarray(heat).resize((DISPLAY, DISPLAY), Image.BILINEAR)


def self_components(cache: ResultCache, key, n, cmap):
    res, comps = components(cache.get(key), int(n))
    return [(Image.fromarray(colorize(c.numpy(), cmap)).resize((DISPLAY // 2, DISPLAY // 2), Image.NEAREST),
             f"component {i + 1} ({res}x{res})") for i, c in enumerate(comps)]


def export_files(cache: ResultCache, key, *view_args) -> list[str]:
    result = cache.get(key)
    out = tempfile.mkdtemp(prefix="concept-studio-attention-")
    return [str(p) for p in export(result, _fit_steps(view_from(*view_args), result), out)]


def after_run(cache: ResultCache, key):
    """Controls that depend on the result: step sliders, resolutions, heads, the clickable image."""
    result = cache.get(key)
    last = max(result.steps - 1, 0)
    heads = ["mean"] + [str(i) for i in range(result.heads or 0)]
    res = [str(r) for r in result.resolutions()]
    return (slider(maximum=last, value=0), slider(maximum=last, value=last), slider(maximum=last, value=-1),
            gr.CheckboxGroup(choices=res, value=res), gr.Dropdown(choices=heads, value="mean"),
            display_image(cache, key), None)


# -- layout ---------------------------------------------------------------------------------------
def build(manager: PipelineManager) -> SimpleNamespace:
    cache = ResultCache()
    pipe = manager.pipe
    resolutions = models.of(pipe).attention_resolutions()
    res_choices = [str(r) for r in resolutions]
    with gr.Row():
        with gr.Column(scale=2):
            mode = gr.Radio(list(MODES), value=MODES[0], label="Source")
            prompt = gr.Textbox(label="Prompt", value="a red circle and a blue square", lines=2)
            negative = gr.Textbox(label="Negative prompt (its maps: 'Branch: negative')", lines=1)
            with gr.Row():
                seed = gr.Textbox(label="Seed (-1: random)", value="0", max_lines=1)
                steps = slider(1, MAX_STEPS, value=20, step=1, label="Steps")
            with gr.Group(visible=False) as image_box:
                upload = gr.Image(label="Image to analyse", type="filepath", sources=["upload", "clipboard"])
                with gr.Row():
                    timestep = slider(0, pipe.scheduler.config.num_train_timesteps - 1, value=DEFAULT_TIMESTEP,
                                         step=1, label="Noise it to timestep t")
                    repeats = slider(1, 16, value=4, step=1, label="Noise draws (averaged)")
            with gr.Accordion("Capture and sampling", open=False):
                per_step = gr.Checkbox(value=True, label="Keep every step (step range and scrubber)")
                heads = gr.Checkbox(value=False, label="Keep heads (one-head views)")
                self_step = number(value=-1, precision=0, label="Self-attention step (-1: the middle step)")
                guidance = slider(0, 20, value=7.5, step=0.5, label="Guidance scale")
                sampler = gr.Dropdown(list(SAMPLERS), value="DPM++ 2M", label="Sampler")
            with gr.Accordion("Attention control: when a concept goes missing", open=False):
                method = gr.Radio(["none", "attend-excite", "a-star"], value="none", label="Guidance")
                subjects = gr.Textbox(label="Subject words (comma-separated)", value="circle, square")
                with gr.Row():
                    scale_factor = number(value=default_scale_factor(models.of(pipe).latent_side),
                                             label="Scale factor (published: 20)")
                    max_iter = number(value=25, precision=0, label="Steps to alter (of 50)")
                    resolution = gr.Dropdown(res_choices, value=str(default_resolution(resolutions)),
                                             label="Map resolution")
                thresholds = gr.Textbox(value="0:0.05, 10:0.5, 20:0.8",
                                        label="Refinement thresholds, step:peak (steps of 50; scaled to the run)")
                reweight = gr.Textbox(label="Reweight tokens, prompt-to-prompt (e.g. circle=2, red=0.5)")
                compare = gr.Checkbox(value=True, label="Also run without control on the same seed")
            with gr.Row():
                run_btn = gr.Button("Run", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            status = gr.Markdown()
        with gr.Column(scale=3):
            with gr.Row():
                image_view = gr.Image(label="Click a pixel: its self-attention", type="pil", interactive=False,
                                      height=DISPLAY, format="png")
                self_view = gr.Image(label="Self-attention of the clicked pixel", type="pil", interactive=False,
                                     height=DISPLAY, format="png")
            words = gr.Textbox(label="Words (comma-separated; empty: every word)")
            with gr.Row():
                special = gr.Checkbox(value=False, label="Show SOS/EOS")
                branch = gr.Radio(["prompt", "negative"], value="prompt", label="Branch")
                head = gr.Dropdown(["mean"], value="mean", label="Head")
            with gr.Row():
                res_box = gr.CheckboxGroup(res_choices, value=res_choices, label="Resolutions")
                blocks = gr.CheckboxGroup(list(BLOCKS), value=list(BLOCKS), label="Blocks")
            with gr.Row():
                step_from = slider(0, 19, value=0, step=1, label="From step")
                step_to = slider(0, 19, value=19, step=1, label="To step")
                scrub = slider(-1, 19, value=-1, step=1, label="Scrub one step (-1: the range)")
            with gr.Row():
                cmap = gr.Dropdown(list(COLORMAPS), value="jet", label="Colormap")
                alpha = slider(0, 1, value=0.5, step=0.05, label="Alpha")
                normalization = gr.Radio(list(NORMALIZATIONS), value="word", label="Normalize")
                tau = slider(0, 1, value=0.4, step=0.05, label="Threshold τ")
                outline = gr.Checkbox(value=False, label="Outline mask ≥ τ")
            gallery = gr.Gallery(label="Word maps", columns=4, height="auto", object_fit="contain", format="png")
            base_gallery = gr.Gallery(label="Without control (same seed)", columns=4, height="auto",
                                      object_fit="contain", format="png")
            table = gr.Dataframe(headers=SUMMARY_COLUMNS, value=[], interactive=False, wrap=True,
                                 label="Per word: peak probability, area ≥ τ of its peak, step-to-step retention, "
                                       "overlap with other words (A-STAR's segregation measure)")
            with gr.Accordion("Self-attention components (prompt-to-prompt)", open=False):
                n_comps = slider(1, 12, value=6, step=1, label="Components")
                comps_btn = gr.Button("Show components", size="sm")
                comps = gr.Gallery(columns=6, height="auto", format="png")
            with gr.Accordion("Export", open=False):
                export_btn = gr.Button("Export grid, maps and manifest", size="sm")
                files = gr.File(label="Files", file_count="multiple", interactive=False)

    key, base_key = gr.State(None), gr.State(None)
    view_inputs = [words, special, branch, res_box, blocks, head, step_from, step_to, scrub, cmap, alpha,
                   normalization, tau, outline]
    run_inputs = [mode, prompt, negative, seed, steps, guidance, sampler, per_step, heads, self_step, upload,
                  timestep, repeats, method, subjects, scale_factor, max_iter, thresholds, resolution, reweight, compare]

    @user_errors
    def on_run(*values, progress=gr.Progress()):
        return run(manager, cache, *values, progress=progress_reporter(progress, "denoising"))

    mode.change(lambda m: gr.Group(visible=m == MODES[1]), mode, image_box, queue=False)
    run_event = run_btn.click(on_run, run_inputs, [key, base_key, status], api_name="attention_run", **GPU)
    stop.click(stop_own_job(manager), None, None, api_name="attention_stop", queue=False)
    redraw = user_errors(lambda k, b, *v: render(cache, k, b, *v) if k else (gr.skip(),) * 3)  # nothing run yet
    run_event.success(user_errors(lambda k: after_run(cache, k)), key,
                      [step_from, step_to, scrub, res_box, head, image_view, self_view]
                      ).success(redraw, [key, base_key, *view_inputs], [gallery, table, base_gallery])
    sliders = [step_from, step_to, scrub, alpha, tau]
    triggers = ([words.submit, words.blur] + [s.release for s in sliders]
                + [c.input for c in view_inputs if c is not words and c not in sliders])
    gr.on(triggers, redraw, [key, base_key, *view_inputs], [gallery, table, base_gallery], show_progress="hidden")

    @user_errors
    def on_click(k, r, b, h, c, evt: gr.SelectData):
        return click(cache, k, evt.index, r, b, h, c) if k else (gr.skip(), gr.skip())

    image_view.select(on_click, [key, res_box, blocks, head, cmap], [image_view, self_view])
    comps_btn.click(user_errors(lambda k, n, c: self_components(cache, k, n, c)), [key, n_comps, cmap], comps)
    export_btn.click(user_errors(lambda k, *v: export_files(cache, k, *v)), [key, *view_inputs], files,
                     api_name="attention_export")
    return SimpleNamespace(cache=cache, run_event=run_event, edit_events=[], key=key,
                           inputs=SimpleNamespace(run=run_inputs, view=view_inputs))
