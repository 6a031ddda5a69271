"""ImageNet weights the normal way, without the internet: a fake Hugging Face hub on 127.0.0.1.

The server speaks the part of the hub protocol ``hf_hub_download`` uses: ``HEAD`` and ``GET`` on
``/{repo_id}/resolve/{revision}/{filename}``, answering with ``X-Repo-Commit`` and ``ETag``, and
404 with ``X-Error-Code`` for what it does not have. timm's ``test_resnet`` is pointed at the fake
repository by swapping its registered pretrained config (``hf_hub_id``)."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from timm.models._registry import _model_pretrained_cfgs

from competition.cli import EXPECTED_ERRORS
from level1_models import pretrained
from level1_models.config import build_config
from level1_models.modeling import PretrainedWeightsMissing, build_model, choose_weights

REPO_ID = "fake-org/test-resnet"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = "tiny_resnet"  # timm test_resnet, cpu_friendly, 3 windows


class FakeHub(ThreadingHTTPServer):
    """Serves ``files`` (url path -> bytes) like the hub; ``requests`` lists (method, path) of file requests."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str]] = []
        self.broken = False  # answer without X-Repo-Commit: "not a hub", a fast unreachable-endpoint failure

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:
        pass

    def _answer(self, with_body: bool) -> None:
        if "/resolve/" not in self.path:  # the client's own side requests (e.g. /api/agent-harnesses)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.server.requests.append((self.command, self.path))
        body = self.server.files.get(self.path)
        if self.server.broken:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body is None:
            repo_known = any(p.startswith(self.path.split("/resolve/")[0] + "/") for p in self.server.files)
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound" if repo_known else "RepoNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def do_GET(self) -> None:
        self._answer(with_body=True)


def closed_port() -> int:
    """A local port nobody listens on (bound, then released): connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def imagenet_state_dict() -> dict[str, torch.Tensor]:
    """An "ImageNet" test_resnet (1000 classes, 3 channels) with its own random weights."""
    torch.manual_seed(123)
    return {k: v.contiguous() for k, v in timm.create_model("test_resnet", pretrained=False).state_dict().items()}


@pytest.fixture
def served(tmp_path):
    hub = FakeHub()
    sd = imagenet_state_dict()
    hub.files[f"/{REPO_ID}/resolve/main/model.safetensors"] = safetensors.torch.save(sd)
    thread = threading.Thread(target=hub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield hub, sd
    hub.shutdown()
    hub.server_close()


def point_hub_at(monkeypatch, endpoint: str, hf_home: Path, offline: bool = False) -> None:
    """What setting HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE before the run does: huggingface_hub reads
    them into its constants at import, so in-process they are patched there too."""
    from huggingface_hub import constants

    for name, value in (("HF_ENDPOINT", endpoint), ("HF_HOME", str(hf_home))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture(autouse=True)
def fake_repo(monkeypatch, tmp_path):
    """test_resnet's weights live in the fake repository; nothing of the real caches is seen."""
    cfg = _model_pretrained_cfgs["test_resnet"]
    monkeypatch.setitem(_model_pretrained_cfgs, "test_resnet", dataclasses.replace(cfg, hf_hub_id=REPO_ID, url=None))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    pretrained.forget_failures()
    yield
    pretrained.forget_failures()


def hub_file(hf_home: Path) -> Path:
    return hf_home / "hub" / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT / "model.safetensors"


def test_download_lands_in_hf_home_and_loads_then_the_cache_needs_no_request(served, tmp_path, monkeypatch, capsys):
    hub, sd = served
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    model = build_model(build_config(TINY))
    assert torch.equal(model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])
    assert torch.equal(model.state_dict()["layer1.0.conv1.weight"], sd["layer1.0.conv1.weight"])
    assert hub_file(tmp_path / "hf").is_file()
    assert f"starting from ImageNet weights {hub_file(tmp_path / 'hf')}" in capsys.readouterr().err
    assert [m for m, _ in hub.requests] == ["HEAD", "GET"]
    hub.requests.clear()
    pretrained.forget_failures()
    assert choose_weights(build_config(TINY)).path == hub_file(tmp_path / "hf")
    assert hub.requests == []  # the cache answers: no request at all


@pytest.mark.slow  # a fresh interpreter importing torch: ~20 s on a busy 2-core machine
def test_environment_variables_are_honoured_by_a_fresh_process(served, tmp_path):
    """HF_ENDPOINT / HF_HOME set by the user, read by huggingface_hub at import: a real new process."""
    hub, sd = served
    weights = tmp_path / "expected.safetensors"
    safetensors.torch.save_file(sd, str(weights))
    script = (
        "import dataclasses, safetensors.torch, torch; from timm.models._registry import _model_pretrained_cfgs as r;"
        f"r['test_resnet'] = dataclasses.replace(r['test_resnet'], hf_hub_id={REPO_ID!r});"
        "from level1_models.config import build_config; from level1_models.modeling import build_model;"
        "m = build_model(build_config('tiny_resnet'), announce=False);"
        f"sd = safetensors.torch.load_file({str(weights)!r});"
        "assert torch.equal(m.state_dict()['conv1.0.weight'], sd['conv1.0.weight'])"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert hub_file(tmp_path / "hf").is_file()
    assert ("GET", f"/{REPO_ID}/resolve/main/model.safetensors") in hub.requests


def test_offline_full_size_spec_fails_naming_the_three_ways_out(tmp_path, monkeypatch):
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf", offline=True)
    connects: list[object] = []

    def no_network(sock, address):  # offline mode answers without trying (its speed: `make bench-checks`)
        connects.append(address)
        raise OSError("the test forbids connections")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    for name in ("resnet50", "efficientnet_b7"):
        with pytest.raises(PretrainedWeightsMissing) as err:
            build_model(build_config(name))
        assert connects == [], f"offline mode tried the network: {connects}"
        text = str(err.value)
        assert "\n" not in text and get_arch(name) in text and "HF_HUB_OFFLINE is set" in text
        assert "connect to the internet" in text
        assert 'SET="pretrained_file=PATH"' in text and 'SET="pretrained=false"' in text
    assert issubclass(PretrainedWeightsMissing, EXPECTED_ERRORS)  # the CLIs print it as one line
    assert not (tmp_path / "hf" / "hub" / pretrained._MEMO_DIR).exists()  # the user's switch: not remembered
    # The ways out work: from scratch on purpose, or a given file.
    assert choose_weights(build_config("resnet50", {"pretrained": False})).path is None
    given = tmp_path / "w.safetensors"
    safetensors.torch.save_file(imagenet_state_dict(), str(given))
    assert choose_weights(build_config(TINY, {"pretrained_file": str(given)})).path == given


def get_arch(name: str) -> str:
    return build_config(name).arch


def test_tiny_spec_falls_back_to_scratch_with_one_line_unless_required(tmp_path, monkeypatch, capsys):
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf", offline=True)
    model = build_model(build_config(TINY))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "training from scratch" in lines[0] and "HF_HUB_OFFLINE is set" in lines[0]
    assert model.get_classifier().out_features == 6
    with pytest.raises(PretrainedWeightsMissing, match="require_pretrained=true.*Ways out"):
        choose_weights(build_config(TINY, {"require_pretrained": True}))


def test_unreachable_endpoint_is_tried_once_then_remembered_for_ten_minutes(served, tmp_path, monkeypatch):
    hub, sd = served
    hub.broken = True  # answers, but not as a hub: the client gives up without retrying
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    first = choose_weights(build_config(TINY))
    assert first.path is None and "training from scratch" in first.note and len(hub.requests) == 1
    assert choose_weights(build_config(TINY)).path is None and len(hub.requests) == 1  # this process: remembered
    pretrained.forget_failures()  # as a new process (the next fold, the next model of the demo)
    again = choose_weights(build_config(TINY))
    assert again.path is None and len(hub.requests) == 1 and "remembered from 0 min ago" in again.note
    with pytest.raises(PretrainedWeightsMissing, match="remembered"):  # a full-size spec: the error, at once
        choose_weights(build_config(TINY, {"cpu_friendly": False}))
    assert len(hub.requests) == 1
    # Ten minutes later the endpoint is asked again.
    marker = next((tmp_path / "hf" / "hub" / pretrained._MEMO_DIR).iterdir())
    old = time.time() - pretrained.UNREACHABLE_MEMO_S - 1
    os.utime(marker, (old, old))
    pretrained.forget_failures()
    hub.broken = False
    assert choose_weights(build_config(TINY)).path == hub_file(tmp_path / "hf")
    assert len(hub.requests) == 3


def test_a_remembered_failure_yields_to_a_file_that_appears_and_to_another_endpoint(served, tmp_path, monkeypatch):
    hub, sd = served
    hub.broken = True
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    assert choose_weights(build_config(TINY)).path is None
    # Another endpoint (another mirror) is not covered by this endpoint's failure.
    other = FakeHub()
    other.files = dict(hub.files)
    threading.Thread(target=other.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        point_hub_at(monkeypatch, other.url, tmp_path / "hf")
        assert choose_weights(build_config(TINY)).path == hub_file(tmp_path / "hf")
        assert len(other.requests) == 2
    finally:
        other.shutdown()
        other.server_close()
    # Back on the failed endpoint: the file now in the cache wins, with no request.
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    assert choose_weights(build_config(TINY)).path == hub_file(tmp_path / "hf")
    assert len(hub.requests) == 1


def test_a_missing_repository_is_remembered_per_process_only(served, tmp_path, monkeypatch):
    hub, sd = served
    hub.files.clear()
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    with pytest.raises(PretrainedWeightsMissing, match="RepositoryNotFoundError|404"):
        choose_weights(build_config(TINY, {"cpu_friendly": False}))
    n = len(hub.requests)
    assert n >= 1
    with pytest.raises(PretrainedWeightsMissing):
        choose_weights(build_config(TINY, {"cpu_friendly": False}))
    assert len(hub.requests) == n
    assert not (tmp_path / "hf" / "hub" / pretrained._MEMO_DIR).exists()


def test_pytorch_file_is_used_when_the_repo_has_no_safetensors(served, tmp_path, monkeypatch):
    hub, sd = served
    body = hub.files.pop(f"/{REPO_ID}/resolve/main/model.safetensors")
    path = tmp_path / "w.bin"
    torch.save(safetensors.torch.load(body), path)
    hub.files[f"/{REPO_ID}/resolve/main/pytorch_model.bin"] = path.read_bytes()
    point_hub_at(monkeypatch, hub.url, tmp_path / "hf")
    model = build_model(build_config(TINY), announce=False)
    assert torch.equal(model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])
    names = [p.rsplit("/", 1)[-1] for _, p in hub.requests]
    assert names == ["model.safetensors", "pytorch_model.bin", "pytorch_model.bin"]  # HEAD 404, HEAD, GET


def test_an_architecture_with_only_a_url_downloads_into_torch_hub(served, tmp_path, monkeypatch):
    """The few timm archs without a hub id: timm's URL, into torch hub's checkpoints folder."""
    hub, sd = served
    path = tmp_path / "w.pth"
    torch.save(sd, path)
    hub.files["/plain/resolve/test_resnet_in1k.pth"] = path.read_bytes()
    point_hub_at(monkeypatch, "http://127.0.0.1:9", tmp_path / "hf")
    cfg = _model_pretrained_cfgs["test_resnet"]
    monkeypatch.setitem(_model_pretrained_cfgs, "test_resnet",
                        dataclasses.replace(cfg, hf_hub_id=None, url=f"{hub.url}/plain/resolve/test_resnet_in1k.pth"))
    model = build_model(build_config(TINY), announce=False)
    assert torch.equal(model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])
    assert (tmp_path / "torch" / "hub" / "checkpoints" / "test_resnet_in1k.pth").is_file()
    n = len(hub.requests)
    assert choose_weights(build_config(TINY)).path is not None and len(hub.requests) == n  # cached
    # A host that refuses: the error names it; the refusal is remembered for the next process.
    monkeypatch.setitem(_model_pretrained_cfgs, "test_resnet",
                        dataclasses.replace(cfg, hf_hub_id=None, url=f"http://127.0.0.1:{closed_port()}/x/other.pth"))
    with pytest.raises(PretrainedWeightsMissing, match="refused.*Ways out"):
        choose_weights(build_config(TINY, {"cpu_friendly": False}))
    pretrained.forget_failures()
    assert "remembered" in choose_weights(build_config(TINY)).note


def test_refused_connection_keeps_the_ways_out_through_the_command_line_layer(tmp_path, monkeypatch, capsys):
    """A refused connection leaves "[Errno 111]" in the reason; the one-line layer must print the
    project's own message (the three ways out), not its generic OS-error line."""
    from competition.cli import run_main

    with socket.socket() as probe:  # a port nobody listens on: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    point_hub_at(monkeypatch, f"http://127.0.0.1:{port}", tmp_path / "hf")

    def main(argv: list[str] | None) -> None:
        build_model(build_config("resnet50"))

    assert run_main(main, [], prog="level1_models") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("level1_models: error: resnet50: could not get ImageNet weights"), line
    assert 'SET="pretrained_file=PATH"' in line and 'SET="pretrained=false"' in line
    assert "fix that, then run the same command again" not in line
