"""Run the real Triton Inference Server (2.51, from the nvidia-pytriton wheel) on a repository.

`TritonServer` is a context manager used by tests, benchmarks and the `faceedit triton` verb:

    with TritonServer(repo, grpc_port=8001, http_port=8000, metrics_port=8002) as server:
        ... tritonclient.grpc.InferenceServerClient(server.grpc_url) ...

What it sets up (see /work/shared/TRITON.md for the recipe it follows):
* the binary `pytriton/tritonserver/bin/tritonserver` inside the installed wheel;
* a private backend directory in a temporary folder: a copy of the wheel's python backend
  plus the `triton_python_backend_stub` built for the running Python version (the wheel
  ships one per version; site-packages is never modified);
* LD_LIBRARY_PATH with the wheel's `nvidia_pytriton.libs` and the folder of libpython;
  this interpreter's bin/ first on PATH, so the stub's embedded Python resolves to our venv
  and imports numpy/onnxruntime from it (the stub ignores PYTHONPATH);
* loopback-only addresses; readiness polled on HTTP /v2/health/ready;
* stop: SIGTERM (Triton unloads models and ends its stub processes), then SIGKILL of the
  whole process group if it does not exit in time, so no stub is ever orphaned.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
STUB_NAME = "triton_python_backend_stub"


class TritonError(RuntimeError):
    """Triton could not be found, started, or did not become ready (message says why)."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the Triton build inside the nvidia-pytriton wheel are."""
    binary: Path
    backends: Path          # folder holding python/ (libtriton_python.so, utils)
    stub: Path              # the stub for the running Python version
    libs: Path              # nvidia_pytriton.libs (shared libraries the binary links)

    @classmethod
    def find(cls) -> "TritonInstall":
        spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise TritonError("the nvidia-pytriton wheel is not installed (pip install 'faceedit[triton]')")
        package = Path(list(spec.submodule_search_locations)[0])
        root = package / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        install = cls(
            binary=root / "bin" / "tritonserver",
            backends=root / "backends",
            stub=root / "python_backend_stubs" / version / STUB_NAME,
            libs=package.parent / "nvidia_pytriton.libs",
        )
        for what, path in (("server binary", install.binary), ("python backend", install.backends / "python"),
                           (f"python backend stub for Python {version}", install.stub),
                           ("shared libraries", install.libs)):
            if not path.exists():
                raise TritonError(f"nvidia-pytriton at {package} has no {what} ({path})")
        return install


def _libpython_dir() -> str:
    return sysconfig.get_config_var("LIBDIR") or str(Path(sys.base_prefix) / "lib")


def _prepend(env: dict[str, str], key: str, paths: list[str]) -> None:
    old = env.get(key, "")
    env[key] = os.pathsep.join(paths + ([old] if old else []))


class TritonServer:
    """The real tritonserver process on `repo`, loopback only, as a context manager."""

    def __init__(self, repo: str | Path, grpc_port: int, http_port: int, metrics_port: int,
                 log_verbose: int = 0, ready_timeout_s: float = 120.0) -> None:
        self.repo = Path(repo).resolve()
        self.grpc_port, self.http_port, self.metrics_port = grpc_port, http_port, metrics_port
        self.log_verbose = log_verbose
        self.ready_timeout_s = ready_timeout_s
        self._process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self._log_file = None

    # -- addresses ---------------------------------------------------------------------
    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int:
        if self._process is None:
            raise TritonError("the server is not running")
        return self._process.pid

    @property
    def backend_directory(self) -> Path:
        """The private backend folder (its path identifies this server's stub processes)."""
        if self._workdir is None:
            raise TritonError("the server is not running")
        return self._workdir / "backends"

    @property
    def log_path(self) -> Path:
        if self._workdir is None:
            raise TritonError("the server is not running")
        return self._workdir / "tritonserver.log"

    # -- lifecycle ---------------------------------------------------------------------
    def __enter__(self) -> "TritonServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _prepare_backends(self, install: TritonInstall) -> Path:
        backends = self._workdir / "backends"
        shutil.copytree(install.backends / "python", backends / "python")
        # Triton's python backend starts `<backend dir>/python/triton_python_backend_stub`
        shutil.copy2(install.stub, backends / "python" / STUB_NAME)
        return backends

    def command(self, install: TritonInstall, backends: Path) -> list[str]:
        return [
            str(install.binary),
            f"--model-repository={self.repo}",
            f"--backend-directory={backends}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
            f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}",
            # every config is complete (written by the exporter): never let Triton guess
            "--disable-auto-complete-config",
            # a model that fails to load is a failed start, not a half-working server
            "--exit-on-error=true",
            f"--log-verbose={self.log_verbose}",
        ]

    def start(self) -> None:
        if self._process is not None:
            raise TritonError("the server is already running")
        if not self.repo.is_dir():
            raise TritonError(f"model repository {self.repo} does not exist")
        install = TritonInstall.find()
        self._workdir = Path(tempfile.mkdtemp(prefix="faceedit-triton-"))
        try:
            backends = self._prepare_backends(install)
            env = dict(os.environ)
            _prepend(env, "LD_LIBRARY_PATH", [str(install.libs), _libpython_dir()])
            # The stub embeds Python and IGNORES PYTHONPATH (checked with Triton 2.51: sys.path
            # had only the base interpreter's site-packages); it derives sys.prefix from the
            # `python3` found on PATH. Putting this interpreter's bin/ first makes that our
            # venv's python (its pyvenv.cfg adds the venv's site-packages: numpy, onnxruntime).
            _prepend(env, "PATH", [str(Path(sys.executable).parent)])
            self._log_file = open(self.log_path, "wb")
            # own process group: stop() can kill the server together with every stub it forked
            self._process = subprocess.Popen(
                self.command(install, backends), env=env, stdout=self._log_file,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
            log.info("started tritonserver pid %d on %s (grpc %d, http %d, metrics %d)",
                     self._process.pid, self.repo, self.grpc_port, self.http_port, self.metrics_port)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, TritonError):
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise TritonError(f"tritonserver exited with code {code} before becoming ready; "
                                  f"log tail:\n{self.log_tail()}")
            if self.is_ready():
                log.info("tritonserver ready at %s", self.grpc_url)
                return
            time.sleep(0.25)
        raise TritonError(f"tritonserver not ready after {self.ready_timeout_s:.0f} s; log tail:\n{self.log_tail()}")

    def poll(self) -> int | None:
        """The exit code once the server has exited, else None."""
        return None if self._process is None else self._process.poll()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, wait; then SIGKILL the process group. Idempotent."""
        process, self._process = self._process, None
        if process is not None:
            try:
                pgid = os.getpgid(process.pid)
            except ProcessLookupError:
                pgid = None
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("tritonserver pid %d ignored SIGTERM for %.0f s; killing its group",
                                process.pid, timeout_s)
            # stubs live in the server's group: anything left there now is an orphan to end
            if pgid is not None:
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


# ---------------------------------------------------------------------------------------
# `faceedit triton` verb


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", required=True, type=Path, help="Triton model repository (faceedit export --out)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")


def run(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("received %s; stopping tritonserver", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server = TritonServer(args.repo, args.grpc_port, args.http_port, args.metrics_port,
                          log_verbose=args.log_verbose, ready_timeout_s=args.ready_timeout)
    try:
        try:
            server.start()
        except TritonError as exc:
            print(f"faceedit triton: {exc}", file=sys.stderr)
            return 1
        print(f"tritonserver ready: grpc {server.grpc_url}, http {server.http_url}, "
              f"metrics {server.metrics_url} (log {server.log_path})", flush=True)
        while not stop.wait(1.0):
            code = server.poll()
            if code is not None:
                print(f"faceedit triton: tritonserver exited with code {code}; log tail:\n{server.log_tail()}",
                      file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
