"""Fixtures shared by the test modules: the tiny model set, dlib's aligner, torch on one thread.

`tiny_set`: the exporter's tiny seeded model set (real architectures, random weights, nine
ONNX networks; building it takes about a minute). It is kept in pytest's cache folder keyed
by the sources that can change it, so one build serves every module of a session and every
later session until those sources change.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# sources whose change can change the exported tiny set
SET_SOURCES = ("exporters", "faceedit/nets", "faceedit/ops.py", "faceedit/onnx_export.py", "faceedit/modelset.py")
TINY_SET_SEED = 0


def sources_digest() -> str:
    h = hashlib.sha256()
    for entry in SET_SOURCES:
        path = REPO / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            if f.is_file():
                h.update(str(f.relative_to(REPO)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def tiny_set(pytestconfig) -> Path:
    """The exporter's tiny seeded model set (seed TINY_SET_SEED), built once per source version.
    Read-only for tests: a test that changes a manifest copies the set first."""
    from exporters.model_set import cached_tiny_model_set

    root = pytestconfig.cache.mkdir("faceedit-tiny-model-set") / f"seed{TINY_SET_SEED}-{sources_digest()}"
    cached_tiny_model_set(root, seed=TINY_SET_SEED)
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module's tests (`pytestmark = pytest.mark.usefixtures(...)`):
    tiny networks are slower on a thread pool contended by a server or by other tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def aligner():
    """dlib's detector and 68-landmark model with the gateway's default settings (loading
    them takes a few seconds, so one per session)."""
    from services.gateway.align import FaceAligner

    return FaceAligner()
