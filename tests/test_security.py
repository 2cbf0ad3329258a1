"""What a stranger on the network, a malicious upload or a booby-trapped checkpoint cannot do."""
import pickle
import socket

import httpx
import pytest
from gradio_client import Client, handle_file

from components.app import launch
from conftest import free_port
from studio.cli import _serve_parser, main
from studio.errors import StudioError
from studio.manager import PipelineManager


@pytest.fixture
def serve(manager):
    """Launch the app with launch() options; yields a function returning (demo, base url)."""
    demos = []

    def start(**options):
        demos.append(launch(manager, port=free_port(), block=False, **options))
        return demos[-1], demos[-1].local_url

    yield start
    for demo in demos:
        demo.close()


def outward_address() -> str | None:
    """This machine's address on its default route (no packet is sent), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            address = s.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def test_loopback_only_by_default(serve):
    assert _serve_parser().parse_args([]).host == "127.0.0.1" and not _serve_parser().parse_args([]).share
    demo, url = serve()
    assert url.startswith("http://127.0.0.1:") and httpx.get(url).status_code == 200
    address = outward_address()
    if address is None:
        pytest.skip("no non-loopback interface to try")
    with pytest.raises(OSError):
        socket.create_connection((address, demo.server_port), timeout=5).close()


def test_auth_is_required_when_asked_for(serve):
    _, url = serve(auth=("ana", "s3cret"))
    assert httpx.get(url + "config").status_code == 401
    assert httpx.post(url + "login", data={"username": "ana", "password": "wrong"}).status_code == 400
    with pytest.raises(Exception):
        Client(url, verbose=False)
    client = Client(url, auth=("ana", "s3cret"), verbose=False)
    assert "image(s)" in client.predict("a red circle", "", "1", 2, 7.5, 64, 64, 1, "DPM++ 2M", api_name="/generate")[1]
    assert main(["--auth", "no-colon"]) == 2


def test_uploads_over_the_limit_are_refused(serve):
    _, url = serve(max_upload="2kb")
    small = httpx.post(url + "gradio_api/upload", files={"files": ("a.png", b"x" * 1000)})
    big = httpx.post(url + "gradio_api/upload", files={"files": ("b.png", b"x" * 5000)})
    assert small.status_code == 200 and big.status_code == 413


def test_only_images_are_accepted_where_images_go(served, tmp_path):
    manager, client = served
    page = tmp_path / "evil.html"
    page.write_text("<script>alert(1)</script>")
    f = manager.fingerprint()
    with pytest.raises(Exception, match="Invalid file type"):  # the Customize tab's image list
        client.predict(param_0=[handle_file(page)] * 3, param_4=None, param_5=None, param_6=None,
                       api_name="/customize_train")
    with pytest.raises(Exception, match="not an image|cannot identify"):  # the Extract tab decodes images only
        client.predict(handle_file(page), 2, api_name="/find_concepts")
    assert manager.fingerprint() == f and manager.history() == []
    # whatever was uploaded is never served back as a page the browser would run
    uploaded = httpx.post(client.src + "gradio_api/upload", files={"files": ("evil.html", page.read_bytes())}).json()[0]
    response = httpx.get(client.src + "gradio_api/file=" + uploaded)
    assert "text/html" not in response.headers.get("content-type", "") or "attachment" in response.headers.get(
        "content-disposition", "")


def test_no_path_outside_the_apps_folders_is_served(served):
    _, client = served
    for path in ("/etc/passwd", __file__, "../../../../etc/passwd", "studio/manager.py"):
        response = httpx.get(client.src + "gradio_api/file=" + path)
        assert response.status_code in (403, 404), path
        assert "root:" not in response.text and "import" not in response.text


def test_monitoring_endpoint_is_off(served):
    _, client = served
    for route in ("monitoring", "monitoring/summary", "gradio_api/monitoring"):
        assert httpx.get(client.src + route).status_code in (403, 404), route


class Trap:
    """A pickle that runs code (here: creates a file) when it is loaded."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_pickle_checkpoints_are_refused_and_never_unpickled(tmp_path, manager):
    sprung = tmp_path / "sprung"
    for name in ("model.ckpt", "embedding.pt", "lora.bin"):
        (tmp_path / name).write_bytes(pickle.dumps({"weights": Trap(sprung)}))
    with pytest.raises(StudioError, match="allow-pickle"):
        PipelineManager(str(tmp_path / "model.ckpt"))
    assert main(["generate", "--model", str(tmp_path / "model.ckpt"), "--prompt", "x"]) == 2
    from studio.customize.formats import import_concept

    for name in ("embedding.pt", "lora.bin"):
        with pytest.raises(StudioError, match="pickle"):
            import_concept([str(tmp_path / name)], "<x>", manager.pipe)
    assert not sprung.exists() and manager.history() == []
