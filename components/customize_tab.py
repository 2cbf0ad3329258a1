"""Customize tab: teach a concept from a few images (with previews), then compose several in one image."""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
from PIL import Image

from studio import models
from studio.customize import library
from studio.customize.formats import export_concept, import_concept
from studio.customize.images import load_images
from studio.customize.scope import SCOPES
from studio.customize.train import DEFAULTS, LORA_TARGETS, METHODS, train_concept
from studio.errors import StudioError
from studio.manager import PipelineManager
from studio.toyworld import presets

from .common import (GPU, PAINT_COLOURS, PAINT_NAMES, blank_canvas, number, painted_masks, slider, stop_own_job,
                     stream_job, user_errors)

METHOD_KEYS = {title: key for key, title in METHODS.items()}
SCOPE_KEYS = {title: key for key, title in SCOPES.items()}


def work_dir(token: str) -> Path:
    """Where a concept's training state is saved (and resumed from)."""
    return Path(tempfile.gettempdir()) / "concept-studio" / "train" / re.sub(r"[^A-Za-z0-9_-]+", "_", token)


def train(manager: PipelineManager, files, token, class_word, method, steps, lr, token_lr, batch, rank, targets,
          vectors, cross_init, semantic, prior, prior_prompts, checkpointing, preview_every, preview_prompts, resume,
          scope, cut_mix, preview=None, progress=None) -> str:
    pipe = manager.pipe
    images, notes = load_images([getattr(f, "name", f) for f in files or []],
                                models.of(pipe).default_size)
    token = str(token or "").strip()
    prompts = [p.strip() for p in (preview_prompts or "").splitlines() if p.strip()]
    edit = train_concept(
        manager, images, token, method=METHOD_KEYS.get(method, method), class_word=class_word,
        steps=steps or None, lr=lr or None, token_lr=token_lr or None, batch=batch, rank=rank, lora_targets=targets,
        vectors=vectors, cross_init=cross_init, semantic_weight=semantic, prior_weight=prior,
        prior_prompts=[p for p in (prior_prompts or "").splitlines() if p.strip()],
        prior_images=min(48, 2 * max(1, len((prior_prompts or "").splitlines()))),
        gradient_checkpointing=checkpointing, preview_every=preview_every,
        preview_prompts=[p.replace("{}", token) for p in prompts] or None,
        preview=(lambda step, shots: preview(shots)) if preview else None, progress=progress,
        save_dir=work_dir(token), resume=bool(resume), scope=SCOPE_KEYS.get(scope, scope), cut_mix=cut_mix)
    manager.apply(edit)
    p = edit.params
    lines = [f"Learned **{token}** with {METHODS[p['method']]}: {p['steps']} steps in {p['train_seconds']:.0f} s, "
             f"final loss {p['final_loss']:.4f}. It is edit #{manager.stack.position} in the History "
             f"({len(p['modules'])} weights changed, acting on {SCOPES[p['scope']]}); use it in prompts as "
             f"`a {token}`."]
    return "\n\n".join(lines + [f"Note: {n}" for n in notes])


def concept_choices(manager: PipelineManager) -> list[tuple[str, int]]:
    return [(c.title, c.index) for c in library.learned_concepts(manager)]


def regions_from_drawing(drawing, words: list[str]) -> list[tuple[str, np.ndarray]]:
    """(words, mask) per region painted in PAINT_COLOURS; regions without words or paint are skipped."""
    masks = painted_masks(drawing, len(words))
    out = [(w.strip(), m) for w, m in zip(words, masks) if w.strip() and m.any()]
    if not out:
        raise StudioError("no region has both words and paint: type the words of each concept and paint its area")
    return out


def build(manager: PipelineManager) -> SimpleNamespace:
    toy = manager.info.kind == "builtin-toy"
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("#### 1 · Teach a concept")
            files = gr.File(label="Images of the concept (3-10; a same-name .txt file is its caption, '{}' marks "
                                  "the token)", file_count="multiple", file_types=["image", ".txt"])
            if toy:
                example = gr.Button("Use 8 toy-world hearts (a shape the model never saw)", size="sm")
            with gr.Row():
                token = gr.Textbox(label="Token", value="<heart>" if toy else "", placeholder="<my-cat>")
                class_word = gr.Textbox(label="Class word (what it is)", value="" if toy else "",
                                        placeholder="cat, dog, painting…")
            method = gr.Radio(list(METHOD_KEYS), value=METHODS["lora"], label="Method")
            scope = gr.Radio(list(SCOPE_KEYS), value=SCOPES["prompt"],
                             label="The concept's weight changes act on (also for imports)")
            with gr.Accordion("Training settings", open=False):
                gr.Markdown("Blank learning rate and steps use the published defaults for this model size: " +
                            "; ".join(f"{METHODS[k]}: lr {v['lr']:g}, {v['steps']} steps" for k, v in DEFAULTS.items()))
                with gr.Row():
                    steps = number(label="Steps (blank: default)", precision=0, value=None)
                    lr = number(label="Learning rate (blank: default)", value=None)
                    token_lr = number(label="Token learning rate (blank: default)", value=None)
                with gr.Row():
                    batch = slider(1, 16, value=4, step=1, label="Batch")
                    rank = slider(1, 64, value=16 if toy else 4, step=1, label="LoRA rank")
                    vectors = slider(1, 8, value=1, step=1, label="Vectors per token")
                targets = gr.Dropdown(list(LORA_TARGETS), value="attention+ff" if toy else "attention",
                                      label="LoRA on")
                cross_init = gr.Checkbox(value=True, label="Cross initialization (start from the class word's "
                                                           "text-encoder output)")
                semantic = slider(0, 1, value=0.0, step=0.01, label="Semantic preservation weight "
                                                                         "(ClassDiffusion; needs a class word)")
                prior = slider(0, 2, value=0.0, step=0.1,
                                  label="Prior preservation weight (images the model draws now, kept while it learns)")
                cut_mix = slider(0, 0.9, value=0.5 if toy else 0.0, step=0.05,
                                 label="Cut-Mix: share of training pictures that pair a concept image with a prior "
                                       "image, side by side ('<token> and <prior prompt>'), so it composes")
                prior_prompts = gr.Textbox(label="Prior prompts, one per line (blank: 'a <class word>')", lines=2,
                                           value="\n".join(presets.toy_prior_prompts()) if toy else "")
                checkpointing = gr.Checkbox(value=False, label="Gradient checkpointing (less memory, slower)")
                with gr.Row():
                    preview_every = slider(10, 500, value=100, step=10, label="Preview every N steps")
                    resume = gr.Checkbox(value=False, label="Resume this token's last saved state")
                preview_prompts = gr.Textbox(label="Preview prompts ('{}' is the token), one per line",
                                             value="a {}\na red {}" if toy else "a photo of {}", lines=2)
            with gr.Row():
                run = gr.Button("Train", variant="primary")
                stop = gr.Button("Stop", variant="stop")
            gr.Markdown("#### 2 · Adjust or compose learned concepts")
            concepts = gr.Dropdown(choices=concept_choices(manager), multiselect=True, label="Learned concepts")
            refresh = gr.Button("↻ Refresh list", size="sm")
            with gr.Row():
                strength = slider(-1, 2, value=1.0, step=0.05, label="Strength")
                set_strength = gr.Button("Set strength", size="sm")
                set_scope = gr.Button("Set scope (above)", size="sm")
            how = gr.Radio(["Closed-form merge (K/V)", "Weighted adapters (unfused)"],
                           value="Closed-form merge (K/V)", label="Compose the selected concepts by")
            weights = gr.Textbox(label="Adapter weights, comma-separated (default 1 each)", value="")
            compose = gr.Button("Compose")
            with gr.Accordion("Export / import concepts", open=False):
                formats = gr.CheckboxGroup(["embedding", "lora", "custom_diffusion"], value=["embedding", "lora"],
                                           label="Export the selected concept as (A1111/ComfyUI embedding, kohya "
                                                 "LoRA, diffusers Custom Diffusion)")
                export_rank = slider(1, 128, value=16, step=1, label="LoRA rank for full changes")
                export_btn = gr.Button("Export", size="sm")
                exported = gr.File(label="Exported files", file_count="multiple", interactive=False)
                imports = gr.File(label="Import: embedding / kohya LoRA / Custom Diffusion files (.safetensors)",
                                  file_count="multiple", file_types=[".safetensors", ".pt", ".bin"])
                import_token = gr.Textbox(label="Token for an imported embedding (blank: from the file)")
                import_btn = gr.Button("Import and apply", size="sm")
            with gr.Accordion("Regions: each concept in its painted area", open=False):
                region_words = [gr.Textbox(label=f"Words painted in {n}", value=v) for n, v in
                                zip(PAINT_NAMES, ("red circle", "blue square", "") if toy else ("", "", ""))]
                collage = slider(0, 1, value=0.2 if toy else 0.0, step=0.05,
                                 label="Collage: draw each region's words alone, place them in their areas, then "
                                       "redraw this share of the steps with the full prompt, each area with only "
                                       "its own concepts (0: only mask attention)")
                canvas = gr.ImageEditor(value=blank_canvas(), type="numpy", image_mode="RGBA", canvas_size=(256, 256),
                                        brush=gr.Brush(colors=list(PAINT_COLOURS), color_mode="fixed",
                                                       default_size=24), label="Paint regions (image frame)")
                apply_regions = gr.Button("Apply regions")
            with gr.Accordion("Multi-Concept T2I-Zero (training-free text-embedding correction)", open=False):
                zero_words = gr.Textbox(label="Concept words in the prompt, comma-separated",
                                        value="circle, square" if toy else "")
                apply_zero = gr.Button("Switch on T2I-Zero correction")
        with gr.Column(scale=3):
            status = gr.Markdown()
            previews = gr.Gallery(label="Previews during training", columns=4, height="auto", format="png")

    settings = [files, token, class_word, method, steps, lr, token_lr, batch, rank, targets, vectors, cross_init,
                semantic, prior, prior_prompts, checkpointing, preview_every, preview_prompts, resume, scope, cut_mix]

    @user_errors
    def on_train(*values, progress=gr.Progress()):
        job = lambda preview, tick: train(manager, *values, preview=preview, progress=tick)  # noqa: E731
        for shots, result in stream_job(job, progress, "training"):
            yield (result if result is not None else "Training… (previews on the right)"), shots

    def listed():
        return gr.update(choices=concept_choices(manager))

    @user_errors
    def on_strength(selected, s):
        if len(selected or []) != 1:
            raise StudioError("select exactly one learned concept to change its strength")
        library.set_strength(manager, selected[0], float(s))
        return f"Strength of #{selected[0]} set to {float(s):g} (edits after it were re-applied)."

    @user_errors
    def on_scope(selected, scope_):
        if len(selected or []) != 1:
            raise StudioError("select exactly one learned concept to change where it acts")
        library.set_strength(manager, selected[0], scope=SCOPE_KEYS.get(scope_, scope_))
        return f"#{selected[0]} now acts on {scope_} (edits after it were re-applied)."

    @user_errors
    def on_compose(selected, how_, weights_):
        w = [float(x) for x in weights_.split(",") if x.strip()] or None
        entry = library.compose(manager, selected or [], "merge" if how_.startswith("Closed") else "adapters", w,
                                presets.toy_reg_prompts() if toy else None)
        return f"Composed: **{entry.edit.title}** (the concepts' own entries are switched off, not deleted)."

    @user_errors
    def on_regions(drawing, collage_, *words):
        from studio.customize.compose import region_edit

        entry = manager.apply(region_edit(regions_from_drawing(drawing, list(words)), collage=float(collage_)))
        return f"Applied: **{entry.edit.title}**. Undo it from the History to sample without regions."

    @user_errors
    def on_zero(words_):
        from studio.customize.compose import t2i_zero_edit

        entry = manager.apply(t2i_zero_edit([w.strip() for w in words_.split(",") if w.strip()]))
        return f"Applied: **{entry.edit.title}**."

    @user_errors
    def on_export(selected, formats_, rank_):
        if len(selected or []) != 1:
            raise StudioError("select exactly one learned concept to export")
        result = export_concept(library.concept_edit(manager, selected[0]),
                                Path(tempfile.mkdtemp(prefix="studio-concept-")), formats_, int(rank_), model=manager)
        files = [f for paths in result["written"].values() for f in paths]
        problems = [f"{k}: {v}" for k, v in result["errors"].items()]
        return files, "\n\n".join([f"Exported {', '.join(result['written']) or 'nothing'}."] + result["notes"] +
                                   [f"Not exported: {p}" for p in problems])

    @user_errors
    def on_import(files_, token_, scope_):
        edit = import_concept([getattr(f, "name", f) for f in files_ or []], token=token_.strip() or None,
                              pipe=manager, scope=SCOPE_KEYS.get(scope_, scope_))
        entry = manager.apply(edit)
        return f"Imported and applied **{entry.edit.title}** (edit #{manager.stack.position})."

    train_event = run.click(on_train, settings, [status, previews], api_name="customize_train", **GPU)
    stop.click(stop_own_job(manager), None, None, queue=False)
    refresh.click(listed, None, concepts, queue=False)
    events = [train_event,
              set_strength.click(on_strength, [concepts, strength], status, api_name="concept_strength", **GPU),
              set_scope.click(on_scope, [concepts, scope], status, api_name="concept_scope", **GPU),
              compose.click(on_compose, [concepts, how, weights], status, api_name="compose", **GPU),
              apply_regions.click(on_regions, [canvas, collage, *region_words], status, api_name="regions", **GPU),
              apply_zero.click(on_zero, zero_words, status, api_name="t2i_zero", **GPU),
              import_btn.click(on_import, [imports, import_token, scope], status, api_name="concept_import", **GPU)]
    export_btn.click(on_export, [concepts, formats, export_rank], [exported, status], api_name="concept_export", **GPU)
    for event in events:
        event.success(listed, None, concepts, show_progress="hidden")
    if toy:
        example.click(lambda: toy_example_files(), None, files, queue=False)
    return SimpleNamespace(edit_events=events)


def toy_example_files() -> list[str]:
    """The toy world's held-out hearts written as images with caption files, for the file box."""
    folder = Path(tempfile.mkdtemp(prefix="toy-hearts-"))
    paths = []
    for i, (image, caption) in enumerate(presets.toy_examples("heart")):
        path = folder / f"heart-{i}.png"
        Image.fromarray(image).save(path)
        path.with_suffix(".txt").write_text(caption)
        paths += [str(path), str(path.with_suffix(".txt"))]
    return paths
