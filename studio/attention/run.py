"""Generate with attention captured (optionally guided); capture leaves the images as a plain run makes them."""
from __future__ import annotations

from dataclasses import dataclass

from ..capture import capture
from ..errors import StudioError
from ..generation import GenerationRequest
from ..tokenizer import sequence_length
from .control import AttentionGuidance, Control
from .result import AttentionResult, from_session


@dataclass
class CaptureOptions:
    per_step: bool = True            # keep head-averaged maps of every step
    heads: bool = False              # keep every head's running sum (one-head views)
    negative: bool | None = None     # capture the negative prompt's maps; None: when one is given
    self_step: int | None = None     # keep self-attention Q/K at this step; None: the middle; -1: none


def generate_with_maps(manager, request: GenerationRequest, options: CaptureOptions | None = None,
                       control: Control | None = None, progress=None) -> AttentionResult:
    """One generation with cross-attention (and self-attention Q/K at one step) captured."""
    options = options or CaptureOptions()
    pipe, r = manager.pipe, request.validated(manager.pipe)
    if not r.prompt.strip():
        raise StudioError("type a prompt: the maps show where each of its words attends")
    control = control if control and control.active else None
    self_step = r.steps // 2 if options.self_step is None else int(options.self_step)
    self_step = self_step if 0 <= self_step < r.steps else None
    plugins = control.plugins(pipe.tokenizer, r.prompt, manager.check_stop) if control else []
    with capture(manager, per_step=options.per_step, heads=options.heads,
                 negative=bool(r.negative_prompt) if options.negative is None else options.negative,
                 tokens=sequence_length(pipe.tokenizer, r.prompt, r.negative_prompt),
                 self_steps=() if self_step is None else (self_step,), plugins=plugins) as session:
        out = manager.generate(r, progress)
    settings = dict(mode="generate", sampler=r.sampler, steps=r.steps, guidance=r.guidance, width=r.width,
                    height=r.height, self_attention_step=self_step,
                    control=control.describe() if control else None, model=manager.describe())
    result = from_session(session, mode="generate", images=out.images, prompt=r.prompt, negative=r.negative_prompt,
                          seeds=out.seeds, steps=r.steps, tokenizer=pipe.tokenizer, settings=settings,
                          seconds=out.seconds)
    result.control_log = [row for p in plugins if isinstance(p, AttentionGuidance) for row in p.log]
    result.warnings = list(out.warnings)
    return result


def compare_control(manager, request: GenerationRequest, control: Control, options: CaptureOptions | None = None,
                    progress=None) -> tuple[AttentionResult, AttentionResult]:
    """(without, with) the control, on the same seed(s): what the guidance changed."""
    r = request.validated(manager.pipe)  # fixes a random seed once, for both runs
    control.plugins(manager.pipe.tokenizer, r.prompt)  # bad settings fail before any work
    half = (lambda done, total: progress(done, 2 * total)) if progress else None
    rest = (lambda done, total: progress(total + done, 2 * total)) if progress else None
    with manager.lock:  # no edit can land between the two runs
        return (generate_with_maps(manager, r, options, None, half),
                generate_with_maps(manager, r, options, control, rest))
