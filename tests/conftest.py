"""Suite-wide test configuration: the gpu and trt markers skip themselves where absent, two
threads per test, and the on-disk cache of tiny bundles. The helpers themselves are in
fixtures.py (this directory is on sys.path, so every package's tests import them)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


def _has_tensorrt() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False here")
    skip_trt = pytest.mark.skip(reason="tensorrt is not installed (TensorRT ships no CPU wheels; "
                                       "run these tests on a GPU machine with TensorRT)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "trt" in item.keywords and not _has_tensorrt():
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _two_threads():
    """Keep every test on the machine's two cores (and deterministic across runs)."""
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def bundle_cache(request, tmp_path_factory) -> Path:
    """Where tiny bundles are kept: pytest's cache when enabled (reused across runs)."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("lddm-runtime-bundles") if cache is not None else tmp_path_factory.mktemp("bundles")
