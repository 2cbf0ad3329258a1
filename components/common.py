"""What every tab shares: the GPU concurrency group and turning engine errors into UI messages."""
from __future__ import annotations

import functools

import gradio as gr

from studio.errors import JobStopped, StudioError

# Every event that touches the model joins this group: one GPU job at a time, app-wide.
GPU = dict(concurrency_id="gpu", concurrency_limit=1)


def user_errors(fn):
    """Show StudioError as a red toast (nothing changed); a stopped job as a notice."""

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
