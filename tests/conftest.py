import os
import socket

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(manager):
    """The app on a free loopback port over a fresh manager, and a gradio_client for it."""
    from gradio_client import Client

    from components.app import launch

    demo = launch(manager, port=free_port(), block=False)
    yield manager, Client(demo.local_url, verbose=False)
    demo.close()
