"""Segment Anything: masks from clicks and boxes, or automatic, for extraction. Checkpoints load without
running pickled code (.safetensors, or `torch.load(weights_only=True)`)."""
from __future__ import annotations

import hashlib
import json
import pickle
import threading
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ..edit_files import read_tensors, save_tensors
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


PRESETS = {
    "vit_b": SamConfig(),
    "vit_l": SamConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamConfig(1280, 32, 16, (7, 15, 23, 31)),
}


def build_sam(config: SamConfig):
    """A randomly initialised Sam of this architecture, as segment_anything's build_sam.py builds them."""
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
    """A built Sam's SamConfig: its weights' shapes, and the decoder's head count."""
    heads = sam.mask_decoder.transformer.layers[0].self_attn.num_heads
    return replace(infer_config(sam.state_dict()), decoder_heads=heads)


def infer_config(state: dict, model_type: str | None = None) -> SamConfig:
    """The architecture of a state dict: `model_type`'s, else from the shapes (decoder heads: the official 8)."""
    if model_type:
        key = str(model_type).lower().replace("-", "_")
        if key not in PRESETS:
            raise StudioError(f"unknown Segment Anything model type {model_type!r}: choose vit_b, vit_l or vit_h")
        return PRESETS[key]
    try:
        dim, _, _, patch = state["image_encoder.patch_embed.proj.weight"].shape
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
    for preset in PRESETS.values():
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
    """(state dict, config from the file's metadata if any); StudioError for anything unsafe or odd."""
    if path is None or not str(path).strip():
        raise StudioError(f"no Segment Anything checkpoint given: {DOWNLOAD_HINT}")
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise StudioError(f"Segment Anything checkpoint {str(path)!r} not found: {DOWNLOAD_HINT}")
    config = None
    if path.suffix.lower() == ".safetensors":
        state, meta = read_tensors(path)
        if meta.get("sam_config"):
            try:
                d = json.loads(meta["sam_config"])
                d["encoder_global_attn_indexes"] = tuple(d.get("encoder_global_attn_indexes", ()))
                config = SamConfig(**d)
            except (TypeError, ValueError) as exc:
                raise StudioError(f"{path.name}: its sam_config metadata is unreadable ({exc})") from None
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
            detail = (str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines() or ["bad data"])[0]
            use = f"Use the official {SAM_VIT_B} or a .safetensors file"
            if "Unsupported global" in detail:
                raise StudioError(f"refused to load {path.name}: it is a pickle that holds more than plain tensors "
                                  f"({detail.split('. ')[0][:120]}), and unpickling it could run code. {use}") from None
            raise StudioError(f"cannot read {path.name} as a PyTorch checkpoint ({detail[:160]}); is the download "
                              f"complete? {use}") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):   # {"model": state_dict} re-saves
            state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudioError(f"{path.name} does not hold a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return state, config


def display_to_image(points, display_size, image_size) -> np.ndarray:
    """Clicks (x, y) on the image shown at display_size (w, h) as pixels of the image (its size (W, H))."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (dw, dh), (w, h) = (float(v) for v in display_size), (float(v) for v in image_size)
    if min(dw, dh, w, h) <= 0:
        raise StudioError(f"sizes must be positive (display {display_size}, image {image_size})")
    _refuse_outside(pts, dw, dh, "displayed image")
    return image_to_display(pts, (w, h), (dw, dh)).clip(0, [w - 1, h - 1])


def image_to_display(points, display_size, image_size) -> np.ndarray:
    """The inverse of `display_to_image`: pixel centre to pixel centre, (x + 0.5) * w / W - 0.5."""
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (dw, dh), (w, h) = (float(v) for v in display_size), (float(v) for v in image_size)
    return (pts + 0.5) * [dw, dh] / [w, h] - 0.5


def _refuse_outside(pts: np.ndarray, w, h, what: str) -> None:
    out = (pts < -0.5).any(1) | (pts[:, 0] > w - 0.5) | (pts[:, 1] > h - 0.5)
    if out.any():
        raise StudioError(f"click ({pts[out][0][0]:g}, {pts[out][0][1]:g}) is outside the {w:g}x{h:g} {what}")


@dataclass
class SamMasks:
    """Segment Anything with its predictor; the last image's embedding is kept (more clicks run only the decoder)."""
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
        state, config = read_checkpoint(checkpoint)
        config = infer_config(state, model_type) if model_type or config is None else config
        sam = build_sam(config)
        own, name = sam.state_dict(), f"Segment Anything {describe(config)}"
        problems = {"missing weights": [k for k in own if k not in state],
                    "unexpected weights": [k for k in state if k not in own],
                    "weights of another shape": [k for k in own if k in state and state[k].shape != own[k].shape]}
        if any(problems.values()):
            what = "; ".join(f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in problems.items() if keys)
            raise StudioError(f"{Path(str(checkpoint)).name} does not fit a {name} model: {what}. "
                              "Give the right model type (vit_b, vit_l, vit_h)")
        sam.load_state_dict(state)
        return cls(sam, device, f"{name} ({Path(str(checkpoint)).name})", config)

    def save(self, path) -> Path:
        """Write the weights as .safetensors, with the architecture in the metadata."""
        if Path(path).suffix.lower() != ".safetensors":
            raise StudioError("save Segment Anything weights as .safetensors")
        meta = {"sam_config": json.dumps(asdict(self.config)), "format": "pt"}
        return save_tensors(self.sam.state_dict(), path, meta)

    def _set_image(self, rgb: np.ndarray) -> None:
        key = hashlib.sha1(rgb.tobytes()).hexdigest() + str(rgb.shape)
        if key != self._image_key:
            self._image_key = None
            self.predictor.set_image(rgb, image_format="RGB")
            self._image_key = key

    def masks_from_clicks(self, image, points=(), labels=None, boxes=None, *, display_size=None) -> np.ndarray:
        """One (H, W) mask of what the clicks (labels 1: on it, 0: not) and boxes (their masks united) point at, in
        image pixels or in those of the image shown at `display_size`."""
        rgb = np.array(load_rgb(image)[0])
        h, w = rgb.shape[:2]
        pts = np.asarray([] if points is None else list(points), dtype=np.float64).reshape(-1, 2)
        lab = np.ones(len(pts), dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(lab) != len(pts):
            raise StudioError(f"{len(pts)} clicks but {len(lab)} labels: give one label (1 on, 0 off) per click")
        if not np.isin(lab, (0, 1)).all():
            raise StudioError("click labels must be 1 (on the object) or 0 (not on it)")
        box_list = np.asarray([] if boxes is None else boxes, dtype=np.float64).reshape(-1, 4)
        if not len(pts) and not len(box_list):
            raise StudioError("click on the object (or draw a box around it) first")
        if len(pts) and not (lab == 1).any() and not len(box_list):
            raise StudioError("every click says 'not the object': click on the object at least once")
        if display_size is not None:
            pts = display_to_image(pts, display_size, (w, h))
            box_list = display_to_image(box_list, display_size, (w, h)).reshape(-1, 4)
        else:
            _refuse_outside(pts, w, h, "image")
        for b in box_list:
            if not (b[2] > b[0] and b[3] > b[1]):
                raise StudioError("a box is (left, top, right, bottom) with right > left and bottom > top; "
                                  f"got {[float(v) for v in b]}")
        multi = len(pts) == 1 and not len(box_list)   # one click: three proposals, the best kept
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
        """The best `max_masks` automatic masks (min_area..max_area of the image, none mostly inside a better one),
        left to right."""
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
        for m in (np.asarray(f["segmentation"], dtype=bool) for f in found):
            if len(kept) < max_masks and not any((m & k).sum() > 0.8 * m.sum() for k in kept):
                kept.append(m)
        return [kept[i] for i in left_to_right(kept)] if kept else []


def describe(config: SamConfig) -> str:
    return next((f"ViT-{name[-1].upper()}" for name, preset in PRESETS.items() if preset == config),
                f"custom ViT ({config.encoder_embed_dim} wide, {config.encoder_depth} deep)")
