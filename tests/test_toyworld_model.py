"""The bundled toy model: loads offline as the default, and knows colours and shapes (fails on random weights)."""
import pytest

from studio.generation import GenerationRequest
from studio.loading import TOY_MODEL
from studio.manager import PipelineManager
from studio.toyworld.evaluate import PromptSpec, Wanted, bundled_oracle, score

PROMPTS = [("a red circle", "circle", "red"), ("a blue square", "square", "blue"), ("a yellow star", "star", "yellow"),
           ("a green triangle", "triangle", "green"), ("a purple circle", "circle", "purple"),
           ("an orange square", "square", "orange")]


@pytest.fixture(scope="module")
def toy():
    assert (TOY_MODEL / "model_index.json").is_file(), "the toy model must be bundled in assets/toy-model"
    m = PipelineManager("builtin", device="cpu")
    assert m.describe().startswith("bundled toy-world model")
    return m


def test_the_toy_model_draws_the_prompted_colour_and_shape(toy):
    specs = [PromptSpec(p, (Wanted(s, c),)) for p, s, c in PROMPTS]
    rates = score(toy, specs, seeds=3)["single"].rates()
    assert rates["colour"] >= 0.8 and rates["shape"] >= 0.7, rates


def test_the_toy_model_follows_synonyms(toy):
    oracle = bundled_oracle()
    images = toy.generate(GenerationRequest("a crimson circle", seed=0, batch=3)).images
    assert sum(oracle.presence(im, "red") for im in images) >= 2
