"""What every tab shares: the GPU concurrency group and turning engine errors into UI messages."""
from __future__ import annotations

import functools
import inspect
import queue
import threading

import gradio as gr

from studio.errors import JobStopped, StudioError

# Every event that touches the model joins this group: one GPU job at a time, app-wide.
GPU = dict(concurrency_id="gpu", concurrency_limit=1)


def user_errors(fn):
    """Show StudioError as a red toast (nothing changed); a stopped job as a notice."""

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except StudioError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
            except JobStopped:
                gr.Info("Stopped. The model and its history are unchanged.")
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StudioError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
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

    threading.Thread(target=run, daemon=True).start()
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
