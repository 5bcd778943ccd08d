import pytest
import torch
import torchfluence

CUDA_READY = torch.cuda.is_available() and torchfluence.build_info()["cuda"]

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not CUDA_READY, reason="needs a CUDA GPU and a build with CUDA kernels"),
        ],
    ),
]


def dtypes_for(device: str) -> list[torch.dtype]:
    """Input dtypes each device's kernels accept (half types use float32 accumulation on CUDA)."""
    base = [torch.float32, torch.float64]
    return base + [torch.float16, torch.bfloat16] if device == "cuda" else base


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
