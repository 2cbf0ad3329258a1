import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture
def manager():
    """A fresh manager on the built-in model (CPU, fp32), loaded."""
    from studio.manager import PipelineManager

    m = PipelineManager("builtin", device="cpu")
    m.pipe
    return m


@pytest.fixture(scope="module")
def toy():
    """The built-in model shared by a test module (for tests that leave it as they found it)."""
    from studio.manager import PipelineManager

    m = PipelineManager("builtin", device="cpu")
    m.pipe.set_progress_bar_config(disable=True)
    return m
