"""Region composition by collage (OMG, Mix-of-Show): each region's words drawn alone are placed in their region,
then the full prompt redraws the last steps (SDEdit), each region by a pass where only its concepts act."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image

from .. import models, steering
from ..edits import edit_kind
from ..fingerprint import edit_digest
from ..generation import SAMPLERS
from .compose import RegionSteering, check_regions, region_grid
from .scope import only, prompt_scopes

CUT_THRESHOLD = 40  # largest channel difference (0..255) from the border colour still counted as background
REGION_SEED_STEP = 10007  # each region is drawn from its own noise
FILL = 0.7  # the placed object's longer side, as a share of its region's shorter side


def region_prompt(prompt: str, words: str) -> str:
    """The clause of `prompt` (split at commas and 'and') that holds `words`, or the words alone."""
    for clause in re.split(r",|\band\b", prompt):
        if words.lower() in clause.lower():
            return clause.strip()
    return words


def border_colour(image: np.ndarray) -> np.ndarray:
    return np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), 0)


def cut_out(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(crop, alpha 0..1) of the bounding box of what differs from the border colour."""
    inside = np.abs(image.astype(np.float32) - border_colour(image)).max(-1) > CUT_THRESHOLD
    if not inside.any():
        return image, np.ones(image.shape[:2], np.float32)
    ys, xs = np.nonzero(inside)
    box = slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1)
    return image[box], inside[box].astype(np.float32)


def place(canvas: np.ndarray, image: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """Paste `image`'s cut-out into `canvas` (in place), centred in `region` (pixels); returns its alpha."""
    crop, alpha = cut_out(image)
    x0, y0, x1, y1 = region
    scale = FILL * min(x1 - x0, y1 - y0) / max(crop.shape[:2])
    h, w = (max(1, round(s * scale)) for s in crop.shape[:2])
    top, left = round((y0 + y1 - h) / 2), round((x0 + x1 - w) / 2)
    crop = np.asarray(Image.fromarray(crop).resize((w, h), Image.BICUBIC), np.float32)
    alpha = np.asarray(Image.fromarray(alpha).resize((w, h), Image.BILINEAR), np.float32)[..., None]
    out = np.zeros(canvas.shape[:2], np.float32)
    ty, tx = slice(max(top, 0), min(top + h, canvas.shape[0])), slice(max(left, 0), min(left + w, canvas.shape[1]))
    sy, sx = slice(ty.start - top, ty.stop - top), slice(tx.start - left, tx.stop - left)
    canvas[ty, tx] = alpha[sy, sx] * crop[sy, sx] + (1 - alpha[sy, sx]) * canvas[ty, tx]
    out[ty, tx] = alpha[sy, sx, 0]
    return out


def region_box(spec: dict, tensors: dict, height: int, width: int) -> tuple[int, int, int, int]:
    """A region's bounding box in pixels (x0, y0, x1, y1)."""
    ys, xs = torch.nonzero(region_grid(spec, tensors, (height, width)), as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


class Collage:
    """The UNet's forward under a collage, and the sampling hook that prepares each generation (`start`)."""

    def __init__(self, pipe, params: dict, tensors: dict):
        self.pipe, self.specs, self.tensors, self.forward = pipe, params["regions"], tensors, None
        self.strength, self.signature = float(params["collage"]), edit_digest(params, tensors)
        self.layout = None

    def fingerprint(self) -> str:
        return f"Collage[{self.signature}]"

    def wrap(self, forward):
        self.forward = forward
        return self

    @torch.no_grad()
    def start(self, pipe, request, latents, tick=lambda done, total: None):
        self.layout = None
        words = [s["words"].strip() for s in self.specs]
        if not all(w.lower() in request.prompt.lower() for w in words):
            return latents
        model, h, w, n = models.of(pipe), request.height, request.width, request.batch
        cfg = model.guided(request.guidance)
        scheduler = SAMPLERS[request.sampler].from_config(pipe.scheduler.config)  # the generation's sampler
        negative, shots, contexts = model.encode([request.negative_prompt]), [], []
        for r, prompt in enumerate(region_prompt(request.prompt, word) for word in words):
            noise, generators = replace(request, seed=request.seed + r * REGION_SEED_STEP).noise(pipe)
            plan = steering.Plan([prompt], n, cfg, h, w, [request.negative_prompt])
            with steering.generation(pipe, plan):  # the region's words alone, a generation of their own
                cond = steering.condition(pipe, model.encode([prompt]), plan)
                shots.append(np.round(255 * model.denoise(
                    cond, negative if cfg else None, steps=request.steps, guidance=request.guidance,
                    scheduler=scheduler, latents=noise.to(pipe.device, pipe.unet.dtype), generator=generators,
                    height=h, width=w, images_per_prompt=n, output="np",
                    on_step=lambda _p, i, _t, kw: tick(i + 1, request.steps) or kw)).astype(np.uint8))
            contexts.append(torch.cat([negative.embeds, cond.embeds]).repeat_interleave(n, 0))
        boxes = [region_box(s, self.tensors, h, w) for s in self.specs]
        pictures, masks = [], []
        for i in range(n):
            canvas = np.broadcast_to(border_colour(shots[0][i]), shots[0][i].shape).astype(np.float32).copy()
            masks.append(np.stack([place(canvas, shot[i], box) for shot, box in zip(shots, boxes)]))
            pictures.append(canvas)
        # each region's pixels on the latent grid, grown by a cell; each pass keeps its concepts and unnamed ones
        x0 = model.encode_images(torch.from_numpy(np.stack(pictures)).permute(0, 3, 1, 2) / 127.5 - 1)
        masks = torch.from_numpy(np.stack(masks))
        grid = F.max_pool2d(F.max_pool2d((masks > 0.5).float(), pipe.vae_scale_factor), 3, 1, 1)
        scopes = prompt_scopes(pipe)
        named = [[s for s in scopes if any(t.lower() in w.lower() for t in s.words)] for w in words]
        unnamed = [s for s in scopes if not any(s in n for n in named)]
        self.layout = dict(x0=x0, grid=grid, scopes=scopes, keep=[n + unnamed for n in named] + [unnamed],
                           hold=round((1 - self.strength) * len(scheduler.timesteps)), context=contexts)
        return latents

    def step_end(self, pipe, i, t, kwargs):
        return kwargs

    def end_generation(self) -> None:  # also after a stop: later direct UNet calls are no generation's
        self.layout = None

    def __call__(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        layout = self.layout
        ts = self.pipe.scheduler.timesteps
        at = (ts == timestep.to(ts.device)).nonzero() if layout is not None else []
        if layout is None or not len(at) or sample.shape[0] % len(layout["x0"]):
            return self.forward(sample, timestep, encoder_hidden_states, *args, **kwargs)
        rows = sample.shape[0] // len(layout["x0"])  # 2 under guidance: [negative, prompt]
        if int(at[0, 0]) < layout["hold"]:
            out = predicting(self.pipe.scheduler, sample, timestep, layout["x0"].to(sample).repeat(rows, 1, 1, 1))
        else:
            passes = []
            contexts = [c[-len(sample):].to(encoder_hidden_states) for c in layout["context"]]
            for keep, context in zip(layout["keep"], contexts + [encoder_hidden_states]):
                with only(layout["scopes"], keep):
                    o = self.forward(sample, timestep, context, *args, **kwargs)
                passes.append(o[0] if isinstance(o, tuple) else o.sample)
            grid = layout["grid"].to(sample).repeat(rows, 1, 1, 1)[:, :, None]
            regions, rest = torch.stack(passes[:-1], 1), passes[-1]
            cover = grid.sum(1)
            out = torch.where(cover > 0, (regions * grid).sum(1) / cover.clamp(min=1e-6), rest)
        return UNet2DConditionOutput(sample=out) if kwargs.get("return_dict", True) else (out,)


def predicting(scheduler, sample: torch.Tensor, timestep, x0: torch.Tensor) -> torch.Tensor:
    """The model output (of the scheduler's prediction type) that predicts exactly `x0` from `sample`."""
    a = scheduler.alphas_cumprod[int(round(float(timestep)))].to(sample)
    eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
    kind = scheduler.config.get("prediction_type", "epsilon")
    return {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[kind]


@edit_kind("compose_regions")
def apply_regions(pipe, params: dict, tensors: dict, patch) -> None:
    check_regions(params, tensors)
    words = ", ".join(s["words"] for s in params["regions"])
    if params.get("collage"):
        collage = Collage(pipe, params, tensors)
        steering.install(patch, pipe, "model", f"collage {words}", collage, {"denoiser": models.of(pipe).denoiser})
        steering.install(patch, pipe, "sampling", f"collage {words}", collage)
    else:
        RegionSteering(pipe, params, tensors).install(patch, f"regions {words}")
