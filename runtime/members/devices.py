"""Where members run in one process (`--device`); under a launcher a rank's device comes from
its LOCAL_RANK instead (runtime/distributed/world.py: rank_device)."""
from __future__ import annotations

import torch


def pick_device(spec: str | None = None) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`; None: CUDA if present, else the CPU."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"--device {spec!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"--device {spec!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: torch sees no CUDA device here (torch {torch.__version__}, "
                         "a CPU build?)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_dtype(name: str, dtype: str, device: torch.device):
    """A member's dtype must work where it runs: bf16 on a GPU needs one that supports it."""
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"member {name!r}: dtype bfloat16, but {torch.cuda.get_device_name(device)} "
                         "does not support it: use float16 (not for Gemma-3, whose activations "
                         "overflow float16) or float32")
