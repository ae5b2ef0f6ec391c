"""Test environment: Triton kernels run on the CPU through the interpreter; no hub lookups."""
import os

# Both must be set before triton / huggingface_hub are imported (triton.jit reads TRITON_INTERPRET).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
