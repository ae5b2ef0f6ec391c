"""Test environment: Triton kernels run through the interpreter when there is no CUDA device; no hub lookups."""
import os

import torch  # torch.cuda.is_available() does not import triton

# Both must be set before triton / huggingface_hub are imported (triton.jit reads TRITON_INTERPRET).
# On a GPU machine the kernels compile for the device: the interpreter would copy every tensor to the host,
# get bf16 wrong and be slow, so `pytest -m gpu` there runs the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import timm  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A tiny ViT teacher in timm's layout, as a user's local weights file (random, but a real checkpoint)."""
    torch.manual_seed(1)
    m = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=0)
    path = tmp_path_factory.mktemp("teacher") / "vit_tiny.safetensors"
    save_file(m.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        arr = (torch.rand(40 + i, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(d / f"img{i}.jpg")
    return d
