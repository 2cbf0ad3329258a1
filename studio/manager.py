"""PipelineManager: the one GPU-resident pipeline of a process, its lock and its edit stack.

Every job that touches the model (generate, edit, train, capture) runs inside `manager.job()`,
which holds the one lock, so a generation never sees a half-applied edit and two browser tabs
never run on the GPU at once. Long jobs call `check_stop()` from their step callback; the user's
stop request then ends them cleanly, with the model untouched.

With a `history_dir`, the whole edit stack (redo tail included) is written atomically after every
change, one file per model, and restored when that model is loaded again: a crash or a kill
loses at most the edit that was running, never leaves one half-applied.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .edit_files import SavedEdit, load_edit_file, load_edits, save_edits
from .edits import Edit, EditStack, Entry, find_tensor, toggled
from .errors import JobStopped, StudioError
from .fingerprint import fingerprint, tensor_digest
from . import models, steering
from .generation import SAMPLERS, GenerationRequest
from .models import Conditioning
from .loading import BUILTIN, ModelInfo, classify_source, load_pipeline

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    request: GenerationRequest
    seconds: float
    warnings: list[str] = field(default_factory=list)


def release_memory() -> None:
    """Free what dropped objects held: Python garbage, CUDA's cached blocks, and the heap pages glibc
    keeps after large frees (without the trim, RSS stays at its peak after a model switch)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        pass


class PipelineManager:
    def __init__(self, source: str = BUILTIN, device: str = "auto", dtype: str = "auto", allow_pickle: bool = False,
                 history_dir: str | Path | None = None):
        classify_source(source, allow_pickle)  # refuse bad sources now, load later
        self._load_args = dict(source=source, device=device, dtype=dtype, allow_pickle=allow_pickle)
        self.history_dir = Path(history_dir) if history_dir else None
        self.restore_notes: list[str] = []  # what restoring the saved history did, for the UI and CLI
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._depth = 0  # how many job() blocks the lock's holder is inside
        self._pipe = None
        self._stack: EditStack | None = None
        self.info: ModelInfo | None = None
        self._fingerprints: dict[tuple, str] = {}

    @classmethod
    def from_pipeline(cls, pipe, name: str = "custom pipeline") -> "PipelineManager":
        """Manage a StableDiffusionPipeline you already built or loaded."""
        m = cls()
        p = next(pipe.unet.parameters())
        m._pipe, m._stack = pipe, EditStack(pipe)
        m.info = ModelInfo(name, "python", str(p.device), str(p.dtype).replace("torch.", ""))
        return m

    # -- model ---------------------------------------------------------------------------
    @property
    def pipe(self):
        with self.lock:
            if self._pipe is None:
                self._pipe, self.info = load_pipeline(**self._load_args)
                self._stack = EditStack(self._pipe)
                self._restore_history()
            return self._pipe

    @property
    def stack(self) -> EditStack:
        self.pipe
        return self._stack

    def load(self, source: str, **overrides) -> ModelInfo:
        """Switch models. The old one stays until the new one has loaded; its history is dropped."""
        args = {**self._load_args, "source": source, **overrides}
        with self.job():
            pipe, info = load_pipeline(**args)
            self._pipe = self._stack = None
            release_memory()
            self._pipe, self.info, self._stack, self._load_args = pipe, info, EditStack(pipe), args
            self._fingerprints.clear()
            self._restore_history()
            return info

    def describe(self) -> str:
        self.pipe
        return self.info.describe()

    def fingerprint(self, cached: bool = False) -> str:
        """Hash of the model state. `cached` reuses the hash of a state already seen through the
        stack (cheap for the UI on big models); the default rehashes every parameter."""
        with self.lock:
            key = tuple(e.serial for e in self.stack.applied)
            if not cached or key not in self._fingerprints:
                self._fingerprints[key] = fingerprint(self.pipe)
            return self._fingerprints[key]

    # -- jobs ----------------------------------------------------------------------------
    @contextmanager
    def job(self):
        """Hold the GPU lock for one job; a stop request made at any moment of the job ends it."""
        with self.lock:
            self._depth += 1
            if self._depth == 1:  # only the outermost job clears the flag: nested jobs (a training
                self._stop.clear()  # preview's generate) must not lose a stop meant for the whole job
            try:
                yield
            finally:
                self._depth -= 1
                if not self._depth:
                    self._stop.clear()

    def request_stop(self) -> None:
        self._stop.set()

    def check_stop(self) -> None:
        if self._stop.is_set():
            raise JobStopped("stopped by the user")

    def generate(self, request: GenerationRequest, progress: Progress | None = None,
                 prompt_embeds: torch.Tensor | None = None) -> GenerationResult:
        """Generate `request`; `prompt_embeds` (1, 77, d), if given, replaces the encoded prompt."""
        with self.job():
            pipe = self.pipe
            model, r = models.of(pipe), request.validated(pipe)
            latents, generators = r.noise(pipe)

            def tick(done: int, total: int) -> None:  # a stop ends the job here; progress is reported
                self.check_stop()
                if progress:
                    progress(done, total)

            def on_step(_pipe, i, t, kwargs):
                tick(i + 1, r.steps)
                return steering.step_end(_pipe, i, t, kwargs)

            cfg = r.guidance > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
            plan = steering.Plan([r.prompt], r.batch, cfg, r.height, r.width, [r.negative_prompt])
            start = time.perf_counter()
            with steering.generation(pipe, plan):
                cond = model.encode([r.prompt]) if prompt_embeds is None else Conditioning(prompt_embeds)
                images = model.denoise(
                    steering.condition(pipe, cond, plan), model.encode([r.negative_prompt]) if cfg else None,
                    steps=r.steps, guidance=r.guidance, scheduler=SAMPLERS[r.sampler].from_config(pipe.scheduler.config),
                    latents=steering.start(pipe, r, latents, tick).to(pipe.device, pipe.unet.dtype), generator=generators,
                    height=r.height, width=r.width, images_per_prompt=r.batch, on_step=on_step)
            return GenerationResult(images, r.seeds, r, time.perf_counter() - start, r.warnings)

    def generate_at(self, request: GenerationRequest, position: int, progress: Progress | None = None) -> GenerationResult:
        """Generate with the first `position` edits applied, then return to the current state exactly."""
        with self.lock:
            here = self.stack.position
            try:
                self.stack.goto(position)
                return self.generate(request, progress)
            finally:
                self.stack.goto(here)

    def compare(self, request: GenerationRequest, index: int | None = None, progress: Progress | None = None):
        """(before, after) results for history entry `index` (1-based; default: the latest applied)."""
        with self.lock:
            index = self.stack.position if index is None else int(index)
            if not 1 <= index <= len(self.stack.entries):
                raise StudioError("there is no edit to compare: apply one first" if not self.stack.entries
                                  else f"edit #{index} does not exist (history has {len(self.stack.entries)})")
            request = GenerationRequest(**{**request.__dict__, "seed": request.validated(self.pipe).seed})
            return self.generate_at(request, index - 1, progress), self.generate_at(request, index, progress)

    # -- edits ---------------------------------------------------------------------------
    def apply(self, edit: Edit) -> Entry:
        with self.job():
            return self._saved(self.stack.apply(edit))

    def replace(self, index: int, edit: Edit) -> Entry:
        """Swap history entry `index` (1-based, applied) for `edit`, re-applying the edits after it."""
        with self.job():
            return self._saved(self.stack.replace(int(index), edit))

    def toggle(self, index: int) -> Entry:
        """Switch applied entry `index` off (it stays in the history, changing nothing) or back on."""
        with self.lock:
            if not 1 <= int(index) <= self.stack.position:
                raise StudioError(f"edit #{index} is not applied: redo up to it first")
            return self.replace(index, toggled(self.stack.entries[int(index) - 1].edit))

    def undo(self) -> Entry | None:
        with self.lock:
            return self._saved(self.stack.undo())

    def redo(self) -> Entry | None:
        with self.lock:
            return self._saved(self.stack.redo())

    def reset(self) -> None:
        """Back to the model as loaded (the undone edits stay available for redo)."""
        with self.lock:
            self._saved(self.stack.goto(0))

    def history(self) -> list[dict]:
        with self.lock:
            return self.stack.rows()

    def save_edits(self, path: str | Path) -> Path:
        with self.lock:
            return save_edits(self.stack.applied, path)

    def load_edits(self, path: str | Path) -> list[str]:
        """Apply every edit of a file on top of the current state, all or none; returns notes."""
        saved = load_edits(path)
        with self.job():
            notes = self._apply_saved(saved)
            self._saved(None)
        return notes

    def _apply_saved(self, saved: list[SavedEdit]) -> list[str]:
        notes, start = [], self.stack.position
        try:
            for s in saved:
                same = all(tensor_digest(find_tensor(self.pipe, n)) == d for n, d in s.original_digests.items())
                entry = self.stack.apply(s.edit)
                exact = {n: tensor_digest(t) for n, t in entry.patch.results.items()} == s.result_digests
                notes.append(f"{s.edit.title}: " + (
                    "re-applied exactly" if same and exact else
                    "re-applied; results differ in the last bits (other device or library version)" if same else
                    "recomputed for this model (it differs from the one the edit was saved on)"))
        except BaseException:
            self.stack.goto(start)
            del self.stack.entries[start:]
            raise
        return notes

    # -- the saved history ---------------------------------------------------------------------
    @property
    def history_path(self) -> Path | None:
        """Where this model's history is kept: one file per model source, in `history_dir`."""
        if self.history_dir is None:
            return None
        source = self._load_args["source"]
        slug = re.sub(r"[^\w.-]+", "_", Path(source).name or source)[:40]
        return self.history_dir / f"history-{slug}-{hashlib.sha1(source.encode()).hexdigest()[:8]}.safetensors"

    def _saved(self, result):
        """Write the whole stack after a change (atomically); a failure to write is logged, not raised:
        the edit itself succeeded and stays."""
        path = self.history_path
        if path is not None:
            try:
                save_edits(self._stack.entries, path, position=self._stack.position, model=self._load_args["source"])
            except OSError as exc:
                log.warning("could not save the edit history to %s: %s", path, exc)
        return result

    def _restore_history(self) -> None:
        """Bring back the saved history of this model: the same edits, the same position, the same redo tail.
        An unreadable file is set aside (renamed *.unreadable) and the model starts clean."""
        path, self.restore_notes = self.history_path, []
        if path is None or not path.is_file():
            return
        try:
            saved = load_edit_file(path)
            notes = self._apply_saved(saved.edits)
            self._stack.goto(saved.position)
        except (StudioError, KeyError, ValueError) as exc:
            aside = path.with_name(path.name + ".unreadable")
            path.replace(aside)
            self.restore_notes = [f"the saved history could not be restored ({exc}); it was moved to {aside.name}"]
            return
        self.restore_notes = [f"restored {len(notes)} edit(s) from the last session, {saved.position} applied"] + notes
