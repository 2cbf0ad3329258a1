"""Maps for any image: encode it, noise it to a chosen timestep, run the UNet once with the prompt.

The VAE encodes the image (the latent distribution's mean), the training scheduler's
`add_noise` takes it to timestep t (any t in 0..999, whatever sampler the studio uses), and one
conditional UNet pass with capture hooked on gives the maps. `repeats` averages the maps over
several noise draws (one batch), which steadies them at high t.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import StudioError
from ..generation import parse_seed
from .result import AttentionResult, from_session
from .tokens import sequence_length

DEFAULT_TIMESTEP = 100


def open_image(image) -> Image.Image:
    """A PIL image (any mode, alpha kept) from a path, a PIL image or an array; StudioError otherwise."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise StudioError("no image: upload one first")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise StudioError(f"cannot read the image {str(path)!r}: no such file")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as exc:
            raise StudioError(f"cannot read {path.name!r} as an image ({exc.__class__.__name__}): "
                              "upload a PNG, JPEG or WebP") from None
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
            raise StudioError(f"the image must be H x W x 3 (RGB), H x W x 4 (RGBA) or H x W (grey); "
                              f"got an array of shape {a.shape}")
        if a.dtype == bool:
            a = a.astype(np.uint8) * 255
        elif a.dtype != np.uint8:
            a = a.astype(np.float64)
            if not np.isfinite(a).all():
                raise StudioError("the image has NaN or infinite pixel values")
            a = np.clip(a * (255 if a.max() <= 1 else 1), 0, 255).round().astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(a))
    if isinstance(image, Image.Image):
        return image
    raise StudioError(f"expected an image (a file path, a PIL image or an array), got {type(image).__name__}")


def load_image(image) -> Image.Image:
    """A PIL RGB image (alpha dropped) from a PIL image, an array or a file path; StudioError otherwise."""
    image = open_image(image)
    if min(image.size) < 8:
        raise StudioError(f"the image is too small ({image.width}x{image.height}); it needs at least 8x8 pixels")
    return image.convert("RGB")


def noising(pipe, timestep, repeats) -> tuple[int, int]:
    """The checked (timestep, repeats) of a noise-the-image-and-look pass."""
    try:
        timestep, repeats = int(timestep), int(repeats)
    except (TypeError, ValueError):
        raise StudioError("timestep and repeats must be whole numbers") from None
    limit = pipe.scheduler.config.num_train_timesteps
    if not 0 <= timestep < limit:
        raise StudioError(f"timestep must be from 0 to {limit - 1} (got {timestep})")
    if not 1 <= repeats <= 16:
        raise StudioError(f"repeats must be from 1 to 16 (got {repeats})")
    return timestep, repeats


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """Centre-crop to the model's aspect ratio, then resize to its size."""
    return ImageOps.fit(image, (width, height), Image.BICUBIC)


def image_maps(manager, image, prompt: str, timestep: int = DEFAULT_TIMESTEP, seed=0, negative: str = "",
               repeats: int = 1, heads: bool = False, self_attention: bool = True) -> AttentionResult:
    """Cross-attention maps of `prompt` on an uploaded image noised to `timestep` (and its self-attention Q/K)."""
    image = load_image(image)
    prompt, negative = str(prompt or ""), str(negative or "")
    if not prompt.strip():
        raise StudioError("type a prompt that describes the image: its words get the maps")
    seed = parse_seed(seed)
    with manager.job():
        pipe = manager.pipe
        timestep, repeats = noising(pipe, timestep, repeats)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        shown = fit(image, size, size)
        start = time.perf_counter()
        device, dtype = pipe.device, pipe.unet.dtype
        cfg = bool(negative)
        with manager.capture(per_step=False, heads=heads, negative=cfg,
                             tokens=sequence_length(pipe.tokenizer, prompt, negative),
                             self_steps=(0,) if self_attention else ()) as session, torch.no_grad():
            x = pipe.image_processor.preprocess(shown, height=size, width=size).to(device, pipe.vae.dtype)
            latent = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
            noise = torch.randn((repeats, *latent.shape[1:]), generator=torch.Generator("cpu").manual_seed(seed))
            t = torch.tensor([timestep], device=device)
            noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(
                latent.expand(repeats, -1, -1, -1).to(dtype), noise.to(device, dtype), t)
            cond, uncond = pipe.encode_prompt(prompt, device, repeats, cfg, negative_prompt=negative or None)[:2]
            session.begin(cfg, noisy.shape[-2:])
            manager.check_stop()
            pipe.unet(torch.cat([noisy, noisy]) if cfg else noisy, t,
                      encoder_hidden_states=torch.cat([uncond, cond]) if cfg else cond)
        settings = dict(mode="image", timestep=timestep, repeats=repeats, noise_seed=seed, width=size, height=size,
                        original_size=list(image.size), model=manager.describe())
        result = from_session(session, mode="image", images=[shown], prompt=prompt, negative=negative, seeds=[seed],
                              steps=1, tokenizer=pipe.tokenizer, settings=settings,
                              seconds=time.perf_counter() - start)
    # one image: average the noise draws
    result.means = {n: m.mean(1, keepdim=True) for n, m in result.means.items()}
    result.self_qk = {s: {n: (q[:1], k[:1]) for n, (q, k) in d.items()} for s, d in result.self_qk.items()}
    return result
