"""Shared test set-up: Triton interpreter on CPU-only machines, seeding, and the GPU marker."""
import os

import pytest

# Must happen before any module imports triton: kernels then run through the interpreter.
if not os.environ.get("CUDA_VISIBLE_DEVICES") == "" and os.environ.get("TRITON_INTERPRET") is None:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch is a hard dependency
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")
