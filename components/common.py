"""What every tab shares: the GPU concurrency group and turning engine errors into UI messages."""
from __future__ import annotations

import contextvars
import functools
import html
import inspect
import math
import queue
import threading

import gradio as gr
import numpy as np

from gradio.context import LocalContext

from studio.errors import JobStopped, StudioError
from studio.manager import OWNER

# Every event that touches the model joins this group: one GPU job at a time, app-wide.
GPU = dict(concurrency_id="gpu", concurrency_limit=1)


def finite_only(component):
    """Make a Number or Slider answer NaN or infinity (a script can send them; a page cannot) with a
    message naming the field, before Gradio's own conversion fails with a cryptic one."""
    plain = component.preprocess

    def preprocess(payload):
        if isinstance(payload, float) and not math.isfinite(payload):
            raise gr.Error(f"{component.label or 'A number'}: got {payload}; enter a finite number", print_exception=False)
        return plain(payload)

    component.preprocess = preprocess
    return component


def number(*args, **kwargs) -> gr.Number:
    return finite_only(gr.Number(*args, **kwargs))


def slider(*args, **kwargs) -> gr.Slider:
    return finite_only(gr.Slider(*args, **kwargs))


def session() -> str | None:
    """The browser session of the event being handled (None outside one)."""
    return getattr(LocalContext.request.get(None), "session_hash", None)


def stop_own_job(manager):
    """A Stop button's handler: it ends the job its own browser session started, never another user's."""
    return lambda: manager.request_stop(session())


def toast(text: str) -> str:
    """Text from a user or a file, safe to show in a toast or Markdown (Gradio renders them as HTML)."""
    return html.escape(str(text), quote=False)


def user_errors(fn):
    """Show StudioError as a red toast (nothing changed); a stopped job as a notice. The jobs it runs are
    owned by the event's browser session, so that session's Stop ends them (and only them)."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            OWNER.set(session())
            try:
                yield from fn(*args, **kwargs)
            except StudioError as exc:
                raise gr.Error(toast(exc), print_exception=False) from None
            except JobStopped:
                gr.Info("Stopped. The model and its history are unchanged.")
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        OWNER.set(session())
        try:
            return fn(*args, **kwargs)
        except StudioError as exc:
            raise gr.Error(toast(exc), print_exception=False) from None
        except JobStopped:
            gr.Info("Stopped. The model and its history are unchanged.")
            return gr.skip()

    return wrapper


def progress_reporter(progress: gr.Progress, desc: str):
    return lambda done, total: progress((done, total), desc=desc)


def stream_job(job, progress: gr.Progress | None = None, desc: str = "working"):
    """Run `job(preview, tick)` in a thread; yield (latest previews, None) as they come, then (previews, result).

    The job calls preview(images) to show intermediate images and tick(done, total) for progress;
    both are relayed from this (the event's) thread, so Gradio sees them. Errors re-raise here.
    """
    updates: queue.Queue = queue.Queue()
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = job(lambda images: updates.put(("preview", list(images))),
                                    lambda done, total: updates.put(("tick", (done, total))))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the event's thread
            outcome["error"] = exc
        updates.put(("done", None))

    threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True).start()  # the job's OWNER
    previews: list = []
    while True:
        kind, value = updates.get()
        if kind == "preview":
            previews = value
            yield previews, None
        elif kind == "tick" and progress is not None:
            progress(value, desc=desc)
        elif kind == "done":
            break
    if "error" in outcome:
        raise outcome["error"]
    yield previews, outcome["result"]


# Painting masks on a canvas: brush colour i paints mask i (regions, extraction masks).
PAINT_COLOURS = ("#e02020", "#2050e0", "#20a040")
PAINT_NAMES = ("red", "blue", "green")


def blank_canvas(size: int = 256, background=None) -> dict:
    bg = np.full((size, size, 3), 255, np.uint8) if background is None else background
    return {"background": bg, "layers": [], "composite": None}


def painted_masks(drawing, count: int) -> list[np.ndarray]:
    """One boolean mask per brush colour (the first `count` of PAINT_COLOURS) from an ImageEditor value."""
    drawing = drawing or {}
    layer = next((np.asarray(x) for x in drawing.get("layers") or [] if x is not None and np.asarray(x).ndim == 3),
                 None)
    if layer is None or layer.shape[-1] != 4 or not layer[..., 3].any():
        raise StudioError("draw the masks first: paint each concept's area in its colour")
    rgb = layer[..., :3].astype(int)
    refs = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in PAINT_COLOURS])
    nearest = np.abs(rgb[..., None, :] - refs).sum(-1).argmin(-1)
    return [(layer[..., 3] > 0) & (nearest == i) for i in range(count)]
