"""The REAL Triton server (2.51 from the nvidia-pytriton wheel) on the cpu repository of the
tiny model set: every model READY, every output equal to PyTorch over gRPC, dynamic batching
really groups concurrent requests, and stopping leaves no python-backend stub behind."""
from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from exporters.model_set import tiny_networks
from exporters.repository import write_repository
from exporters.specs import SPECS
from exporters.triton import TritonError, TritonServer

pytestmark = pytest.mark.triton


SEED = 0
TOLERANCE = 1e-3
REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_pids(marker: str) -> list[int]:
    """pids of triton_python_backend_stub processes whose command line mentions `marker`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "triton_python_backend_stub" in cmdline and marker in cmdline:
            pids.append(int(entry.name))
    return pids


def metric(text: str, name: str, model: str) -> float:
    match = re.search(rf'^{name}{{model="{model}",version="1"}} ([0-9.e+]+)$', text, re.MULTILINE)
    assert match, f"{name} for {model} not in the metrics"
    return float(match.group(1))


@pytest.fixture(scope="module")
def model_set(tiny_set) -> Path:
    return tiny_set


LOOSE = "mapping_loose_shape"


@pytest.fixture(scope="module")
def cpu_repo(model_set, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("triton") / "repo"
    write_repository(model_set, repo, "cpu")
    # one extra model whose config lets any z width through Triton's own shape check, so a
    # bad request reaches onnxruntime inside model.py: exercises its per-request error path
    shutil.copytree(repo / "mapping", repo / LOOSE)
    config = (repo / LOOSE / "config.pbtxt").read_text()
    config = config.replace('name: "mapping"', f'name: "{LOOSE}"')
    config = re.sub(r'(name: "z" data_type: TYPE_FP32 dims: )\[ \d+ \]', r"\1[ -1 ]", config)
    assert "dims: [ -1 ]" in config
    (repo / LOOSE / "config.pbtxt").write_text(config)
    return repo


@pytest.fixture(scope="module")
def server(cpu_repo):
    server = TritonServer(cpu_repo, free_port(), free_port(), free_port(), ready_timeout_s=120)
    with server:
        yield server
    assert stub_pids(str(cpu_repo)) == [], "python backend stubs left running after stop()"


@pytest.fixture(scope="module")
def client(server):
    c = grpcclient.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def _infer(client, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
    tensors = []
    for name, arr in inputs.items():
        t = grpcclient.InferInput(name, list(arr.shape), "FP32")
        t.set_data_from_numpy(arr)
        tensors.append(t)
    result = client.infer(model, tensors, outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def test_every_model_ready_and_equal_to_pytorch(server, client, model_set):
    networks = tiny_networks(SEED)
    served = {m.name for m in client.get_model_repository_index().models}
    assert served == set(SPECS) | {LOOSE}, "the tiny set must exercise every served model"
    for name, spec in SPECS.items():
        assert client.is_model_ready(name), f"{name} is not READY:\n{server.log_tail()}"
        wrapper = spec.wrapper(networks)
        inputs = spec.example_inputs(wrapper, 3, seed=7)
        with torch.no_grad():
            ref = wrapper(*inputs.values())
        ref = dict(zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)))
        got = _infer(client, name, {k: v.numpy() for k, v in inputs.items()}, spec.output_names)
        for out in spec.output_names:
            r = ref[out].numpy()
            assert got[out].shape == r.shape and got[out].dtype == r.dtype, (name, out, got[out].dtype, got[out].shape)
            if out in dict(spec.argmax_of):
                assert np.array_equal(got[out], r), f"{name}.{out}: labels differ from PyTorch"
            else:
                diff = float(np.abs(got[out].astype(np.float64) - r).max())
                assert diff <= TOLERANCE, f"{name}.{out}: Triton vs PyTorch max abs diff {diff}"


def test_dynamic_batching_groups_concurrent_requests(server, client):
    model, n_requests = "synthesis", 24
    spec = SPECS[model]
    before = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    done, errors = threading.Semaphore(0), []

    def callback(result, error):
        if error is not None:
            errors.append(error)
        done.release()

    wrapper = spec.wrapper(tiny_networks(SEED))
    for i in range(n_requests):
        inputs = spec.example_inputs(wrapper, 1, seed=i)
        tensors = []
        for name, arr in inputs.items():
            t = grpcclient.InferInput(name, list(arr.shape), "FP32")
            t.set_data_from_numpy(arr.numpy())
            tensors.append(t)
        client.async_infer(model, tensors, callback)
    for _ in range(n_requests):
        assert done.acquire(timeout=60), "a request never completed"
    assert not errors, errors
    # Triton updates its counters after the response is sent: poll until they settle
    deadline = time.monotonic() + 15.0
    while True:
        after = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        requests = metric(after, "nv_inference_request_success", model) - metric(before, "nv_inference_request_success", model)
        executions = metric(after, "nv_inference_exec_count", model) - metric(before, "nv_inference_exec_count", model)
        if requests >= n_requests or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert requests == n_requests
    assert 1 <= executions < n_requests, f"{n_requests} concurrent requests ran in {executions} executions (no batching)"


def _mapping_request(width: int) -> list:
    z = grpcclient.InferInput("z", [1, width], "FP32")
    z.set_data_from_numpy(np.zeros((1, width), np.float32))
    psi = grpcclient.InferInput("truncation", [1, 1], "FP32")
    psi.set_data_from_numpy(np.ones((1, 1), np.float32))
    return [z, psi]


def test_bad_shape_is_refused_naming_the_input(client):
    with pytest.raises(InferenceServerException, match=r"input 'z' for model 'mapping'. Expected \[-1,32\]"):
        client.infer("mapping", _mapping_request(7))


def test_python_backend_turns_an_onnxruntime_failure_into_an_error_response(client):
    with pytest.raises(InferenceServerException, match=f"{LOOSE}: onnxruntime failed on a batch of 1"):
        client.infer(LOOSE, _mapping_request(7))
    # the model instance survives: the next good request is served
    result = client.infer(LOOSE, _mapping_request(32))
    assert result.as_numpy("w").shape == (1, 32)


def test_start_failure_shows_the_log_tail(tmp_path):
    broken = tmp_path / "repo" / "mapping"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('name: "mapping"\nbackend: "python"\nmax_batch_size: 4\n'
                                         'input [ { name: "z" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
                                         'output [ { name: "w" data_type: TYPE_FP32 dims: [ 4 ] } ]\n')
    (broken / "1" / "model.py").write_text("raise ImportError('deliberately broken model')\n")
    server = TritonServer(tmp_path / "repo", free_port(), free_port(), free_port(), ready_timeout_s=60)
    with pytest.raises(TritonError, match="exited with code") as info:
        server.start()
    assert "mapping" in str(info.value)          # the log tail names the failing model
    assert server.poll() is None                 # stopped and cleaned up
    assert stub_pids(str(tmp_path / "repo")) == []


def test_cli_runs_until_sigterm_and_stops_every_child(cpu_repo, tmp_path):
    # a one-model repository keeps this second server start short
    small = tmp_path / "repo"
    small.mkdir()
    shutil.copytree(cpu_repo / "mapping", small / "mapping")
    http = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "faceedit", "triton", "--repo", str(small), "--grpc-port", str(free_port()),
         "--http-port", str(http), "--metrics-port", str(free_port())],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                ready = urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2).status == 200
            except OSError:
                time.sleep(0.3)
        assert ready, f"faceedit triton never became ready: {proc.stdout.read() if proc.poll() is not None else ''}"
        assert stub_pids(str(small)), "the python backend stub should be running"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "tritonserver ready" in output
    assert stub_pids(str(small)) == []
