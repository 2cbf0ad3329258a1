"""PipelineManager: the one GPU-resident pipeline of a process, its lock (`job()`), its stop flag and its edit stack,
saved after every change to `history_dir` (if given) and restored when the model is loaded again."""
from __future__ import annotations

import contextvars
import ctypes
import gc
import hashlib
import logging
import re
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

from .edit_files import SavedEdit, backup_budget, backup_estimate, load_edit_file, load_edits, save_edits
from .edits import Edit, EditStack, Entry, find_tensor, toggled
from .errors import JobStopped, OverBudget, StudioError
from .fingerprint import fingerprint, tensor_digest
from . import models, steering
from .generation import SAMPLERS, GenerationRequest
from .loading import BUILTIN, ModelInfo, classify_source, load_pipeline

Progress = Callable[[int, int], None]
log = logging.getLogger(__name__)
# Who a job is run for (the UI sets the browser session): a Stop ends only its own owner's job.
OWNER: contextvars.ContextVar = contextvars.ContextVar("studio_job_owner", default=None)
HISTORY_LOCKS: dict[str, object] = {}  # history file -> lock file: this process is its one writer

@dataclass
class GenerationResult:
    images: list
    seeds: list[int]
    request: GenerationRequest
    seconds: float
    warnings: list[str]


def trim_heap() -> None:
    """Give the pages glibc keeps after large frees back to the system (else RSS stays at its peak)."""
    with suppress(OSError, AttributeError):  # not glibc (macOS, Windows, musl)
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
        self._owner = None  # OWNER of the running job
        self.history_warning = ""  # set while the history cannot be saved: the UI shows it
        self._kept = False  # the saved history was too big to restore: not written over while it is there
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
            gc.collect()
            torch.cuda.empty_cache()
            trim_heap()
            self._pipe, self.info, self._stack, self._load_args = pipe, info, EditStack(pipe), args
            self._fingerprints.clear()
            self._restore_history()
            return info

    def describe(self) -> str:
        self.pipe
        return self.info.describe()

    def fingerprint(self, cached: bool = False) -> str:
        """Hash of the model state; `cached` reuses the hash of a stack state already seen (cheap, for the UI)."""
        with self.lock:
            key = tuple(e.serial for e in self.stack.applied)
            if not cached or key not in self._fingerprints:
                self._fingerprints[key] = fingerprint(self.pipe)
            return self._fingerprints[key]

    @contextmanager
    def job(self):
        """Hold the GPU lock for one job; a stop request made at any moment of the job ends it."""
        with self.lock:
            self._depth += 1
            if self._depth == 1:  # only the outermost job clears the flag: nested jobs (a training
                self._stop.clear()  # preview's generate) must not lose a stop meant for the whole job
                self._owner = OWNER.get()
            try:
                yield
            finally:
                self._depth -= 1
                if not self._depth:
                    self._stop.clear()
                    self._owner = None
                    trim_heap()

    def request_stop(self, owner=None) -> None:
        """Stop the running job: `owner`'s only (another user's job runs on), or whichever with None."""
        if owner is None or owner == self._owner:
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

            def tick(done: int, total: int) -> None:
                self.check_stop()
                if progress:
                    progress(done, total)

            def on_step(_pipe, i, t, kwargs):
                tick(i + 1, r.steps)
                return steering.step_end(_pipe, i, t, kwargs)

            cfg = model.guided(r.guidance)
            plan = steering.Plan([r.prompt], r.batch, cfg, r.height, r.width, [r.negative_prompt])
            start = time.perf_counter()
            with steering.generation(pipe, plan):
                cond = model.encode([r.prompt]) if prompt_embeds is None else models.Conditioning(prompt_embeds)
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
            count = len(self.stack.entries)
            if not count:
                raise StudioError("there is no edit to compare: apply one first")
            if not 1 <= index <= count:
                why = "is the model as loaded: nothing comes before it" if index == 0 else "is no edit of the history"
                raise StudioError(f"#{index} {why}: pick an edit from 1 to {count}")
            request = GenerationRequest(**{**request.__dict__, "seed": request.validated(self.pipe).seed})
            return self.generate_at(request, index - 1, progress), self.generate_at(request, index, progress)

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
            return self._saved(self._apply_saved(saved))

    def _apply_saved(self, saved: list[SavedEdit], advice: str = "load fewer edits at a time") -> list[str]:
        """Apply saved edits in order, all or none (on a failure or a stop the stack is exactly as it was);
        OverBudget, before anything is applied if it can be told, when their backups would not fit in memory."""
        budget, used = backup_budget(), 0

        def refuse(need: int):
            raise OverBudget(f"these {len(saved)} edit(s) would keep {need / 2**20:,.0f} MB or more of backups for "
                             f"undo; this machine has room for {budget / 2**20:,.0f} MB (half its free memory): "
                             + advice)

        if (need := backup_estimate(self.pipe, saved)) > budget:
            refuse(need)
        notes, start, before = [], self.stack.position, list(self.stack.entries)
        try:
            for s in saved:
                if self._depth:
                    self.check_stop()
                same = all(tensor_digest(find_tensor(self.pipe, n)) == d for n, d in s.original_digests.items())
                entry = self.stack.apply(s.edit)
                if (used := used + entry.patch.backup_bytes) > budget:  # a file that under-declared what it changes
                    refuse(used)
                exact = {n: tensor_digest(t) for n, t in entry.patch.results.items()} == s.result_digests
                notes.append(f"{s.edit.title}: " + (
                    "re-applied exactly" if same and exact else
                    "re-applied; results differ in the last bits (other device or library version)" if same else
                    "recomputed for this model (it differs from the one the edit was saved on)"))
        except BaseException:
            self.stack.goto(start)
            self.stack.entries[:] = before
            raise
        return notes

    @property
    def history_path(self) -> Path | None:
        """Where this model's history is kept: one file per model source, in `history_dir`."""
        if self.history_dir is None:
            return None
        source = self._load_args["source"]
        slug = re.sub(r"[^\w.-]+", "_", Path(source).name or source)[:40]
        return self.history_dir / f"history-{slug}-{hashlib.sha1(source.encode()).hexdigest()[:8]}.safetensors"

    def _saved(self, result):
        """Write the whole stack after a change, atomically. A failed write never fails the edit: `history_warning`
        says so until one succeeds, and the stale file is set aside so that a restart does not bring it back."""
        path = self.history_path
        if path is not None and not (self._kept and path.exists()) and self._claim_history():
            try:
                save_edits(self._stack.entries, path, position=self._stack.position, model=self._load_args["source"])
                self.history_warning, self._kept = "", False
            except Exception as exc:  # noqa: BLE001 - disk full, read-only, ...
                self.history_warning = (f"The edit history is not being saved ({type(exc).__name__}: {exc}): your "
                                        "edits are applied but will not come back after a restart. "
                                        f"Check {path.parent}.")
                log.warning("could not save the edit history to %s: %s", path, exc)
                with suppress(OSError):
                    path.replace(path.with_name(path.name + ".stale"))
        return result

    def _claim_history(self) -> bool:
        """Make this process the one writer of its model's history (a lock file held until it ends), or say why not."""
        path = self.history_path
        if str(path) in HISTORY_LOCKS:
            return True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = open(f"{path}.lock", "a+")
        except OSError as exc:
            self.history_warning = f"The edit history is not being saved: {path.parent} is not writable ({exc})."
            return False
        if fcntl is not None:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                self.history_warning = (f"Another Concept Studio process saves this model's history ({path.name}), so "
                                        "this one does not: start it with another --history-dir to keep both.")
                return False
        HISTORY_LOCKS[str(path)] = lock
        return True

    def _restore_history(self) -> None:
        """Bring back this model's saved history (edits, position, redo tail). An unreadable file is set aside
        (*.unreadable); one too big for memory is kept, not restored and not written over while it is there."""
        path, self.restore_notes, self.history_warning, self._kept = self.history_path, [], "", False
        if path is None:
            return
        claimed = self._claim_history()
        if not path.is_file():
            return
        try:
            saved = load_edit_file(path)
            notes = self._apply_saved(saved.edits, f"free memory and restart, or move {path} away to start a new one")
            self._stack.goto(saved.position)
        except OverBudget as exc:  # not damaged: it waits for the user
            self._kept = True
            self.restore_notes = [f"the saved history was not restored ({exc}); this session saves no edits over it"]
            self.history_warning = self.history_warning or f"The edit history is not saved: {self.restore_notes[0]}."
            return
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, the studio starts
            aside = path.with_name(path.name + ".unreadable")
            if claimed:  # the file is ours to move
                path.replace(aside)
            self.restore_notes = [f"the saved history could not be restored ({exc})"
                                  + (f"; it was moved to {aside.name}" if claimed else "")]
            return
        self.restore_notes = [f"restored {len(notes)} edit(s) from the last session, {saved.position} applied"] + notes
