"""Two browser clients at once: every generation sees one whole model state, the queue keeps moving,
and a stopped job leaves the model and its history as they were."""
import threading
import time

import numpy as np
from gradio_client import Client
from gradio_client.utils import Status
from PIL import Image

from studio.generation import GenerationRequest
from studio.layer_scale import scale_edit

PROMPT = ["a red circle", "", "3", 4, 7.5, 64, 64, 1, "DPM++ 2M"]
SCALE = (r"attn2\.to_v\.weight", 0.5)
ESD = ["Fine-tuned LoRA (ESD)", "red", "", "green, blue", "toy", "to_end", 0.5, 1, 1, 0, 1e-3, 0, 0.75,
       "esd-x", 2, 1000, 0.01, 2.0, 1.0, ""]


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if isinstance(image, str) else image, dtype=np.int16)


def test_generations_never_see_a_half_applied_edit_and_the_queue_drains(served):
    manager, client = served
    request = GenerationRequest(*PROMPT)
    before = pixels(manager.generate(request).images[0])
    manager.apply(scale_edit(*SCALE))
    after = pixels(manager.generate(request).images[0])
    manager.undo()
    f0 = manager.fingerprint()
    assert np.abs(before - after).max() > 16  # the two states give visibly different images

    seen, errors = [], []

    def painter():  # client 1: generations
        c = Client(client.src, verbose=False)
        for _ in range(6):
            gallery, _ = c.predict(*PROMPT, api_name="/generate")
            seen.append(pixels(gallery[0]["image"]))

    def editor():  # client 2: edits and undos, as fast as it can
        c = Client(client.src, verbose=False)
        for _ in range(4):
            c.predict(*SCALE, api_name="/apply_scale")
            c.predict(api_name="/undo")

    threads = [threading.Thread(target=guarded(fn, errors)) for fn in (painter, editor)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads), "the queue deadlocked"
    assert not errors, errors
    assert len(seen) == 6
    for image in seen:  # each generation ran entirely before or entirely after an edit
        assert min(np.abs(image - before).max(), np.abs(image - after).max()) <= 1
    assert manager.fingerprint() == f0 and manager.stack.position == 0 and len(manager.history()) == 1


def guarded(fn, errors):
    def run():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(repr(exc))
    return run


def test_a_stopped_training_job_leaves_model_and_history_intact_and_the_queue_moves_on(served):
    manager, client = served
    manager.apply(scale_edit(*SCALE))
    f, history = manager.fingerprint(), manager.history()
    other = Client(client.src, verbose=False)
    job = client.submit(*ESD, api_name="/erase")
    deadline = time.time() + 300
    while job.status().code != Status.PROGRESS:  # training is running, inside the GPU lock
        assert time.time() < deadline and not job.done(), job.status()
        time.sleep(0.2)
    waiting = other.submit(*PROMPT, api_name="/generate")  # queued behind the training job
    client.predict(api_name="/stop")
    job.result(timeout=300)
    gallery, status = waiting.result(timeout=300)
    assert len(gallery) == 1 and "image(s)" in status
    assert manager.fingerprint() == f and manager.history() == history
