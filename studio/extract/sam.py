"""Segment Anything: masks from clicks (and boxes) on an image, or automatically, for extraction.

`SamMasks.load(path)` reads a checkpoint without running pickled code: a .safetensors file, or a
.pth/.pt (the official release format) through `torch.load(weights_only=True)`, which loads plain
tensors and refuses anything else. The architecture (ViT-B/L/H) is read from the weights' shapes
or given; a file written by `SamMasks.save` carries its exact configuration in its metadata.

Clicks arrive in the pixel coordinates of the image as the UI shows it (scaled to fit);
`display_to_image` maps them to the image's own pixels (the centre of the clicked display pixel),
which is what SamPredictor expects (it then rescales to its 1024-pixel input itself).
With no checkpoint the Extract tab still has attention masks ('Find concepts') and drawing.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import threading
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..checks import write_atomically
from ..errors import StudioError
from ..images import load_rgb
from .localize import left_to_right

SAM_VIT_B = "sam_vit_b_01ec64.pth"
SAM_VIT_B_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
DOWNLOAD_HINT = (f"download the official Segment Anything ViT-B checkpoint {SAM_VIT_B} ({SAM_VIT_B_URL}, 375 MB) "
                 "and start the studio with --sam-checkpoint PATH/TO/" + SAM_VIT_B + ". Without it, "
                 "'Find concepts' (masks from the model's attention) and drawing masks still work")


@dataclass(frozen=True)
class SamConfig:
    """The architecture of a Sam model (the official ones: `PRESETS`)."""
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SamConfig":
        d = json.loads(text)
        d["encoder_global_attn_indexes"] = tuple(d.get("encoder_global_attn_indexes", ()))
        return cls(**d)


PRESETS = {
    "vit_b": SamConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
}


def build_sam(config: SamConfig):
    """A randomly initialised segment_anything Sam of this architecture (as build_sam.py builds them)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = config
    grid = c.image_size // c.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.encoder_embed_dim, depth=c.encoder_depth,
            num_heads=c.encoder_num_heads, mlp_ratio=4, out_chans=c.prompt_embed_dim, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
            global_attn_indexes=tuple(c.encoder_global_attn_indexes), window_size=c.window_size),
        prompt_encoder=PromptEncoder(embed_dim=c.prompt_embed_dim, image_embedding_size=(grid, grid),
                                     input_image_size=(c.image_size, c.image_size), mask_in_chans=c.mask_in_chans),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=c.decoder_depth, embedding_dim=c.prompt_embed_dim,
                                          mlp_dim=c.decoder_mlp_dim, num_heads=c.decoder_heads),
            transformer_dim=c.prompt_embed_dim, iou_head_depth=c.iou_head_depth,
            iou_head_hidden_dim=c.iou_head_hidden_dim),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375])
    return sam.eval()


def config_of(sam) -> SamConfig:
    """The SamConfig of a built Sam (read from its modules)."""
    enc, dec = sam.image_encoder, sam.mask_decoder
    blocks = list(enc.blocks)
    return SamConfig(
        encoder_embed_dim=enc.patch_embed.proj.out_channels, encoder_depth=len(blocks),
        encoder_num_heads=blocks[0].attn.num_heads,
        encoder_global_attn_indexes=tuple(i for i, b in enumerate(blocks) if b.window_size == 0),
        image_size=enc.img_size, patch_size=enc.patch_embed.proj.kernel_size[0],
        window_size=max((b.window_size for b in blocks), default=0) or 14,
        prompt_embed_dim=sam.prompt_encoder.embed_dim,
        mask_in_chans=sam.prompt_encoder.mask_downscaling[3].out_channels,
        decoder_depth=len(dec.transformer.layers), decoder_heads=dec.transformer.layers[0].self_attn.num_heads,
        decoder_mlp_dim=dec.transformer.layers[0].mlp.lin1.out_features,
        iou_head_depth=dec.iou_prediction_head.num_layers,
        iou_head_hidden_dim=dec.iou_prediction_head.layers[0].out_features)


def infer_config(state: dict, model_type: str | None = None) -> SamConfig:
    """The architecture of a state dict: `model_type` (vit_b, vit_l, vit_h) if given, else from the shapes.

    Official checkpoints are recognised by their embedding width and depth; other shapes are read
    off the weights (heads from the relative position tables; the mask decoder's head count, which
    no weight shape reveals, is the official 8).
    """
    if model_type:
        key = str(model_type).lower().replace("-", "_")
        if key not in PRESETS:
            raise StudioError(f"unknown Segment Anything model type {model_type!r}: choose vit_b, vit_l or vit_h")
        return PRESETS[key]
    try:
        dim = state["image_encoder.patch_embed.proj.weight"].shape[0]
        patch = state["image_encoder.patch_embed.proj.weight"].shape[-1]
        grid = state["image_encoder.pos_embed"].shape[1]
        depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks."))
        rel = [state[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        prompt_dim = state["image_encoder.neck.0.weight"].shape[0]
        dec_depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.transformer.layers."))
        mlp = state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        iou_layers = {int(k.split(".")[3]) for k in state if k.startswith("mask_decoder.iou_prediction_head.layers.")}
        iou_hidden = state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
        mask_in = state["prompt_encoder.mask_downscaling.3.weight"].shape[0]
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        raise StudioError(f"this is not a Segment Anything checkpoint (missing or odd weight: {exc}); use the official "
                          f"{SAM_VIT_B}") from None
    for name, preset in PRESETS.items():
        if (dim, depth) == (preset.encoder_embed_dim, preset.encoder_depth) and grid * patch == preset.image_size:
            return preset
    global_size = 2 * grid - 1
    windowed = [r[0] for r in rel if r[0] != global_size]
    return SamConfig(
        encoder_embed_dim=dim, encoder_depth=depth, encoder_num_heads=dim // rel[0][1],
        encoder_global_attn_indexes=tuple(i for i, r in enumerate(rel) if r[0] == global_size),
        image_size=grid * patch, patch_size=patch, window_size=(windowed[0] + 1) // 2 if windowed else 14,
        prompt_embed_dim=prompt_dim, mask_in_chans=mask_in, decoder_depth=dec_depth, decoder_mlp_dim=mlp,
        iou_head_depth=len(iou_layers), iou_head_hidden_dim=iou_hidden)


def read_checkpoint(path) -> tuple[dict, SamConfig | None]:
    """(state dict, config from the file's metadata if it has one); StudioError for anything unsafe or odd."""
    if path is None or not str(path).strip():
        raise StudioError(f"no Segment Anything checkpoint given: {DOWNLOAD_HINT}")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise StudioError(f"Segment Anything checkpoint {str(path)!r} not found: {DOWNLOAD_HINT}")
    config = None
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise StudioError(f"cannot read {path.name} as safetensors ({exc})") from None
        if meta.get("sam_config"):
            try:
                config = SamConfig.from_json(meta["sam_config"])
            except (TypeError, ValueError) as exc:
                raise StudioError(f"{path.name}: its sam_config metadata is unreadable ({exc})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            detail = next((line.split("error:", 1)[1].strip() for line in text.splitlines()
                           if "WeightsUnpickler error:" in line and line.split("error:", 1)[1].strip()), "")
            if "Unsupported global" in text:
                raise StudioError(
                    f"refused to load {path.name}: it is a pickle that holds more than plain tensors "
                    f"({detail.split('. ')[0][:120]}), and unpickling it could run code. Use the official "
                    f"{SAM_VIT_B} or a .safetensors file") from None
            raise StudioError(f"cannot read {path.name} as a PyTorch checkpoint of tensors "
                              f"({detail[:120] or 'bad data'}); is the download complete? Use the official "
                              f"{SAM_VIT_B} or a .safetensors file") from None
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise StudioError(f"cannot read {path.name} as a PyTorch checkpoint ({str(exc).splitlines()[0][:160]}); "
                              f"is the download complete? Use the official {SAM_VIT_B} or a .safetensors "
                              "file") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):   # {"model": state_dict} re-saves
            state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudioError(f"{path.name} does not hold a state dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, config


# -- display -> image coordinates ------------------------------------------------------------------
def display_to_image(points, display_size, image_size) -> np.ndarray:
    """Clicks at (x, y) pixels of the image as displayed (display_size = (width, height)) as (x, y)
    pixels of the image itself (image_size = (width, height)): the centre of the clicked display
    pixel, (x + 0.5) * W / w - 0.5, so equal sizes map a pixel to itself. (N, 2) float array."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (dw, dh), (w, h) = (float(v) for v in display_size), (float(v) for v in image_size)
    if min(dw, dh, w, h) <= 0:
        raise StudioError(f"sizes must be positive (display {display_size}, image {image_size})")
    if len(pts) and ((pts[:, 0] < -0.5) | (pts[:, 0] > dw - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > dh - 0.5)).any():
        bad = pts[(pts[:, 0] < -0.5) | (pts[:, 0] > dw - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > dh - 0.5)][0]
        raise StudioError(f"click ({bad[0]:g}, {bad[1]:g}) is outside the {dw:g}x{dh:g} displayed image")
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] + 0.5) * w / dw - 0.5
    out[:, 1] = (pts[:, 1] + 0.5) * h / dh - 0.5
    out[:, 0] = out[:, 0].clip(0, w - 1)
    out[:, 1] = out[:, 1].clip(0, h - 1)
    return out


def image_to_display(points, display_size, image_size) -> np.ndarray:
    """The inverse of `display_to_image` (e.g. to draw the clicks back on the displayed image)."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (dw, dh), (w, h) = (float(v) for v in display_size), (float(v) for v in image_size)
    return np.stack([(pts[:, 0] + 0.5) * dw / w - 0.5, (pts[:, 1] + 0.5) * dh / h - 0.5], 1)


# -- the wrapper -----------------------------------------------------------------------------------
@dataclass
class SamMasks:
    """A Segment Anything model with its predictor: clicks/boxes -> one mask, or automatic masks.

    The image embedding (the expensive part) is kept for the last image, so several clicks on the
    same image run only the light mask decoder.
    """
    sam: object
    device: str = "auto"
    name: str = "Segment Anything"
    config: SamConfig | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _image_key: str | None = field(default=None, repr=False)

    def __post_init__(self):
        from segment_anything import SamPredictor

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sam = self.sam.to(self.device).eval()
        self.config = self.config or config_of(self.sam)
        self.predictor = SamPredictor(self.sam)

    @classmethod
    def load(cls, checkpoint, model_type: str | None = None, device: str = "auto") -> "SamMasks":
        """Load a checkpoint (.safetensors, or .pth/.pt with plain tensors only); StudioError with what
        to download if it is missing."""
        state, config = read_checkpoint(checkpoint)
        config = infer_config(state, model_type) if model_type or config is None else config
        sam = build_sam(config)
        own = sam.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            what = "; ".join(f"{len(names)} {kind} (e.g. {names[0]})" for kind, names in
                             (("missing weights", missing), ("unexpected weights", unexpected),
                              ("weights of another shape", wrong)) if names)
            raise StudioError(f"{Path(str(checkpoint)).name} does not fit a Segment Anything {describe(config)} "
                              f"model: {what}. Give the right model type (vit_b, vit_l, vit_h)")
        sam.load_state_dict(state)
        return cls(sam, device, f"Segment Anything {describe(config)} ({Path(str(checkpoint)).name})", config)

    def save(self, path) -> Path:
        """Write the weights as .safetensors, with the architecture in the metadata (loads back exactly)."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix.lower() != ".safetensors":
            raise StudioError("save Segment Anything weights as .safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in self.sam.state_dict().items()}
        meta = {"sam_config": self.config.to_json(), "format": "pt"}
        return write_atomically(path, lambda tmp: save_file(state, str(tmp), metadata=meta))

    # -- prompts -----------------------------------------------------------------------------------
    def _set_image(self, rgb: np.ndarray) -> None:
        key = hashlib.sha1(rgb.tobytes()).hexdigest() + str(rgb.shape)
        if key != self._image_key:
            self._image_key = None
            self.predictor.set_image(rgb, image_format="RGB")
            self._image_key = key

    def masks_from_clicks(self, image, points=(), labels=None, boxes=None, *, display_size=None,
                          multimask: bool | None = None) -> np.ndarray:
        """One mask (H x W bool, the image's size) for the object the clicks (and/or box) point at.

        points: (x, y) clicks; labels: 1 = on the object (default), 0 = not on it. boxes: one box
        (x0, y0, x1, y1) or a list of boxes (one mask each, united). Coordinates are image pixels,
        or pixels of the displayed image when `display_size` = (width, height) is given. With one
        click SAM proposes three masks and the one with the best predicted IoU is kept
        (`multimask`); with more prompts it makes one.
        """
        rgb = np.array(load_rgb(image)[0])
        h, w = rgb.shape[:2]
        pts = np.asarray(list(points) if points is not None else [], dtype=np.float64).reshape(-1, 2)
        lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise StudioError(f"{len(pts)} clicks but {len(lab)} labels: give one label (1 on, 0 off) per click")
        if len(lab) and not np.isin(lab, (0, 1)).all():
            raise StudioError("click labels must be 1 (on the object) or 0 (not on it)")
        box_list = [] if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        if not len(pts) and not len(box_list):
            raise StudioError("click on the object (or draw a box around it) first")
        if len(pts) and not (lab == 1).any() and not len(box_list):
            raise StudioError("every click says 'not the object': click on the object at least once")
        if display_size is not None:
            pts = display_to_image(pts, display_size, (w, h)) if len(pts) else pts
            box_list = [display_to_image(b.reshape(2, 2), display_size, (w, h)).reshape(4) for b in box_list]
        else:
            out = (pts[:, 0] < -0.5) | (pts[:, 0] > w - 0.5) | (pts[:, 1] < -0.5) | (pts[:, 1] > h - 0.5)
            if len(pts) and out.any():
                raise StudioError(f"click ({pts[out][0][0]:g}, {pts[out][0][1]:g}) is outside the {w}x{h} image")
        for b in box_list:
            if not (b[2] > b[0] and b[3] > b[1]):
                raise StudioError("a box is (left, top, right, bottom) with right > left and bottom > top; "
                                  f"got {[float(v) for v in b]}")
        multi = (len(pts) == 1 and not len(box_list)) if multimask is None else bool(multimask)
        result = np.zeros((h, w), dtype=bool)
        with self._lock:
            self._set_image(rgb)
            for box in (box_list if len(box_list) else [None]):
                masks, scores, _ = self.predictor.predict(
                    point_coords=pts if len(pts) else None, point_labels=lab if len(pts) else None,
                    box=box, multimask_output=multi)
                result |= np.asarray(masks[int(np.argmax(scores))], dtype=bool)
        return result

    def automatic(self, image, *, max_masks: int = 8, min_area: float = 0.005, max_area: float = 0.9,
                  **options) -> list[np.ndarray]:
        """Masks of everything SAM finds (SamAutomaticMaskGenerator; `options` go to it), without those
        under `min_area` or over `max_area` of the image, nor those mostly inside a better one; the best
        `max_masks` by predicted IoU x stability, ordered left to right. H x W bool each."""
        from segment_anything import SamAutomaticMaskGenerator

        rgb = np.array(load_rgb(image)[0])
        total = rgb.shape[0] * rgb.shape[1]
        options.setdefault("points_per_side", 16)
        with self._lock:
            self._image_key = None    # the generator sets its own images (crops)
            try:
                found = SamAutomaticMaskGenerator(self.sam, output_mode="binary_mask", **options).generate(rgb)
            except TypeError as exc:
                raise StudioError(f"bad option for automatic masks: {exc}") from None
        found = [f for f in found if min_area * total <= f["area"] <= max_area * total]
        found.sort(key=lambda f: -f["predicted_iou"] * f["stability_score"])
        kept: list[np.ndarray] = []
        for f in found:
            m = np.asarray(f["segmentation"], dtype=bool)
            if any((m & k).sum() > 0.8 * m.sum() for k in kept):
                continue
            kept.append(m)
            if len(kept) >= max_masks:
                break
        return [kept[i] for i in left_to_right(kept)] if kept else []


def describe(config: SamConfig) -> str:
    for name, preset in PRESETS.items():
        if preset == config:
            return name.replace("_", "-").upper().replace("VIT", "ViT")
    return f"custom ViT ({config.encoder_embed_dim} wide, {config.encoder_depth} deep)"
