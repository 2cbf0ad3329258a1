"""Extract tab: one image with several things in it -> masks (found, clicked or painted) -> one token each."""
from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import numpy as np
from PIL import Image

from studio import models
from studio.errors import StudioError
from studio.extract.break_a_scene import DEFAULTS, extract_concepts
from studio.extract.evaluate import evaluate_extraction, table
from studio.extract.localize import check_masks, find_concepts, prepare_image
from studio.images import fit_mask, load_rgb, to_tensor
from studio.manager import PipelineManager
from studio.toyworld.evaluate import bundled_oracle
from studio.training import TrainingImage

from .common import (GPU, PAINT_COLOURS, PAINT_NAMES, blank_canvas, number, painted_masks, slider, stop_own_job,
                     stream_job, user_errors)

MASK_LABELS = [f"mask {i + 1} ({n})" for i, n in enumerate(PAINT_NAMES)]


def model_image(manager: PipelineManager, image) -> tuple[np.ndarray, list[str]]:
    """The upload as the model's square RGB input, and notes (alpha flattened, cropped, resized)."""
    if image is None:
        raise StudioError("upload an image first")
    pipe = manager.pipe
    return prepare_image(image, models.of(pipe).default_size)


def annotated(image: np.ndarray, masks: list[np.ndarray]):
    return image, [(m.astype(float), MASK_LABELS[i] if i < len(MASK_LABELS) else f"mask {i + 1}")
                   for i, m in enumerate(masks)]


def extract(manager: PipelineManager, image, masks, tokens, steps_tokens, steps_joint, lr_tokens, lr_joint, rank,
            attention_weight, background, preview_every, preview=None, progress=None):
    picture, notes = model_image(manager, image)
    masks = [fit_mask(m, picture.shape[0]) for m in masks or []]
    notes += check_masks(masks, picture.shape[:2])
    names = [t.strip() for t in (tokens or "").split(",") if t.strip()]
    edit = extract_concepts(manager, TrainingImage(to_tensor(Image.fromarray(picture))), masks, names,
                            steps_tokens=steps_tokens, steps_joint=steps_joint, lr_tokens=lr_tokens or None,
                            lr_joint=lr_joint or None, rank=rank, attention_weight=attention_weight,
                            background=background, preview_every=preview_every, progress=progress,
                            preview=(lambda step, shots: preview(shots)) if preview else None)
    manager.apply(edit)
    p = edit.params
    message = (f"Extracted {', '.join(names)}: {p['steps']} steps in {p['train_seconds']:.0f} s (edit "
               f"#{manager.stack.position}). Use them in any prompt, e.g. `a {names[0]}`.")
    rows = None
    if manager.info.kind == "builtin-toy":
        concepts = toy_concepts(picture, masks)
        if concepts:
            rows = table(evaluate_extraction(manager, names, concepts, bundled_oracle(), seeds=4))
    else:
        notes.append("No oracle for this model: judge the previews (no CLIP model is available locally to score).")
    return "\n\n".join([message] + notes), rows


def toy_concepts(picture: np.ndarray, masks: list[np.ndarray]) -> list[tuple[str, str]] | None:
    """(shape, colour) the oracle reads under each mask of a toy-world image (None if it cannot)."""
    readings = bundled_oracle().read(picture)
    out = []
    for m in masks:
        best = max(readings, key=lambda r: (r.mask & m).sum(), default=None)
        if best is None or not (best.mask & m).any():
            return None
        out.append((best.shape, best.colour))
    return out


def build(manager: PipelineManager, sam=None) -> SimpleNamespace:
    toy = manager.info.kind == "builtin-toy"
    masks = gr.State([])
    points = gr.State([])
    with gr.Row():
        with gr.Column(scale=2):
            image = gr.Image(label="Image with several things in it (click an object to segment it with SAM)",
                             type="filepath", height=320)  # opened by the engine: clear errors for non-images
            if toy:
                toy_scene = gr.Button("Use a toy-world scene (red heart + yellow triangle)", size="sm")
            with gr.Row():
                find = gr.Button("Find concepts (from the model's self-attention)")
                count = slider(0, 3, value=0, step=1, label="How many (0: automatic)")
            with gr.Accordion("Segment Anything: click objects", open=sam is not None):
                gr.Markdown("Clicks add points to the chosen mask; **Segment** turns them into masks." if sam else
                            "No SAM checkpoint: start the studio with `--sam-checkpoint sam_vit_b_01ec64.pth` "
                            "(from github.com/facebookresearch/segment-anything) to click objects. "
                            "Found or painted masks work without it.")
                target = gr.Radio(MASK_LABELS, value=MASK_LABELS[0], label="Clicks go to")
                with gr.Row():
                    segment = gr.Button("Segment clicked objects", size="sm", interactive=sam is not None)
                    clear = gr.Button("Clear clicks", size="sm")
            with gr.Accordion("Paint masks instead", open=False):
                canvas = gr.ImageEditor(value=blank_canvas(), type="numpy", image_mode="RGBA", canvas_size=(256, 256),
                                        brush=gr.Brush(colors=list(PAINT_COLOURS), color_mode="fixed", default_size=20),
                                        label="Paint each object in its own colour")
                use_paint = gr.Button("Use painted masks", size="sm")
            tokens = gr.Textbox(label="One token per mask, comma-separated", value="<a>, <b>")
            with gr.Accordion("Training settings", open=False):
                with gr.Row():
                    steps_tokens = number(label="Phase 1 steps (tokens)", precision=0,
                                             value=DEFAULTS["toy_steps_tokens" if toy else "steps_tokens"])
                    steps_joint = number(label="Phase 2 steps (tokens + LoRA)", precision=0,
                                            value=DEFAULTS["toy_steps_joint" if toy else "steps_joint"])
                with gr.Row():
                    lr_tokens = number(label="Phase 1 lr (blank: default)", value=None)
                    lr_joint = number(label="Phase 2 lr (blank: default)", value=None)
                rank = slider(1, 64, value=4, step=1, label="LoRA rank")
                attention_weight = number(label="Cross-attention loss weight",
                                          value=DEFAULTS["toy_attention_weight" if toy else "attention_weight"])
                background = gr.Checkbox(value=True, label="Also learn the background (pixels no mask claims)")
                preview_every = slider(10, 500, value=100, step=10, label="Preview every N steps")
            with gr.Row():
                run = gr.Button("Extract", variant="primary")
                stop = gr.Button("Stop", variant="stop")
        with gr.Column(scale=3):
            shown = gr.AnnotatedImage(label="Masks (accept them, or find/click/paint again)")
            status = gr.Markdown()
            previews = gr.Gallery(label="Previews: one image per token", columns=4, height="auto", format="png")
            scores = gr.Dataframe(headers=["token", "object", "shape", "colour", "ACC@1"], interactive=False,
                                  label="Oracle-measured (toy world)")

    @user_errors
    def on_find(image_, count_, progress=gr.Progress()):
        picture, notes = model_image(manager, image_)
        found = find_concepts(manager, picture, count=int(count_) or None)
        return found, annotated(picture, found), "\n\n".join([f"Found {len(found)} concepts."] + notes)

    @user_errors
    def on_click(image_, target_, clicked, evt: gr.SelectData):
        if sam is None:
            raise StudioError("no SAM checkpoint loaded: start with --sam-checkpoint, or find or paint masks")
        return clicked + [(MASK_LABELS.index(target_), *evt.index)]

    @user_errors
    def on_segment(image_, clicked):
        if not clicked:
            raise StudioError("click on the objects first (each click adds a point to the chosen mask)")
        opened = load_rgb(image_)[0]  # a huge upload is reduced: the clicks are on the file's pixels
        picture, clicked_on = np.asarray(opened), opened.info.get("original_size")
        found = []
        for i in sorted({c[0] for c in clicked}):
            pts = [(x, y) for j, x, y in clicked if j == i]
            found.append(sam.masks_from_clicks(picture, pts, [1] * len(pts), display_size=clicked_on))
        size = model_image(manager, image_)[0].shape[0]
        return found, annotated(picture, found), f"Segmented {len(found)} objects (masks are resized to {size}²)."

    @user_errors
    def on_paint(drawing, image_):
        found = [m for m in painted_masks(drawing, len(PAINT_COLOURS)) if m.any()]
        picture = model_image(manager, image_)[0] if image_ is not None else np.full((256, 256, 3), 255, np.uint8)
        found = [fit_mask(m, picture.shape[0]) for m in found]
        return found, annotated(picture, found), f"Using {len(found)} painted masks."

    @user_errors
    def on_extract(image_, masks_, *values, progress=gr.Progress()):
        job = lambda preview, tick: extract(manager, image_, masks_, *values, preview=preview, progress=tick)  # noqa
        for shots, result in stream_job(job, progress, "extracting"):
            yield (result[0] if result else "Training… (previews on the right)"), shots, (result[1] if result else None)

    find.click(on_find, [image, count], [masks, shown, status], api_name="find_concepts", **GPU)
    image.select(on_click, [image, target, points], points, queue=False)
    clear.click(lambda: [], None, points, queue=False)
    segment.click(on_segment, [image, points], [masks, shown, status], api_name="segment", **GPU)
    use_paint.click(on_paint, [canvas, image], [masks, shown, status], queue=False)
    settings = [tokens, steps_tokens, steps_joint, lr_tokens, lr_joint, rank, attention_weight, background,
                preview_every]
    event = run.click(on_extract, [image, masks, *settings], [status, previews, scores], api_name="extract", **GPU)
    stop.click(stop_own_job(manager), None, None, queue=False)
    if toy:
        from studio.toyworld.scenes import make_scene

        toy_scene.click(lambda: make_scene(11, n_objects=2, held_out=True).image, None, image, queue=False)
    return SimpleNamespace(edit_events=[event])
