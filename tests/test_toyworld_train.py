"""The training script end to end at a micro scale: it trains, saves a diffusers folder, and loads back."""
from dataclasses import replace

import torch

from studio.generation import GenerationRequest
from studio.manager import PipelineManager
from studio.toyworld.train import CONFIGS, train

MICRO = replace(CONFIGS["cpu"], scenes=64, unet_channels=(32, 32, 32), vae_steps=3, vae_batch=4, steps=3, batch=4)


def test_micro_training_run_saves_a_loadable_pipeline(tmp_path):
    logs = []
    pipe = train(MICRO, "cpu", seed=0, out=tmp_path / "toy", log=logs.append)
    assert (tmp_path / "toy" / "model_index.json").is_file() and (tmp_path / "toy" / "training.json").is_file()
    assert any("unet step 2/3" in line for line in logs)
    assert pipe.vae.config.scaling_factor != 0.18215  # measured from the trained VAE's latents
    m = PipelineManager(str(tmp_path / "toy"), device="cpu")
    assert m.pipe.unet.dtype == torch.float32 and m.pipe.text_encoder.dtype == torch.float32
    assert m.pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert m.generate(GenerationRequest("a red circle", steps=2)).images[0].size == (64, 64)
