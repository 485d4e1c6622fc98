"""Fixtures of the suite: tiny models of each architecture (built by builders.py), a fresh cache per session, and
OpenBLAS preloaded as the CLI does. MESP_MLX_DEVICE=cpu|gpu chooses the device of the whole suite (default: MLX's,
the GPU where it has one), as it does for every run; tolerances follow it (helpers.py)."""
import os

import mlx.core as mx
import pytest

from builders import TINY, write_tiny, write_tiny_gguf

if os.environ.get("MESP_MLX_DEVICE"):  # before any test module computes its tolerances from the device
    mx.set_default_device(mx.gpu if os.environ["MESP_MLX_DEVICE"] == "gpu" else mx.cpu)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MESP_MLX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(params=sorted(TINY))
def arch(request):
    return request.param


@pytest.fixture
def tiny_dir(tmp_path, arch):
    return write_tiny(tmp_path / arch, arch)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A tiny qwen2 GGUF with Q8_0 tensors and a real BPE tokenizer with a chat template."""
    f = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(f, "qwen2", "Q8_0")
    return f


def pytest_configure(config):
    # Same speed-up as the CLI: run the suite with OpenBLAS preloaded when it is installed.
    from mesp_mlx.blas import ensure_fast_blas
    ensure_fast_blas()
