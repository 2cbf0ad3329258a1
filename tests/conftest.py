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
