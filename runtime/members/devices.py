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


def fast_bf16(device: torch.device) -> bool:
    """Whether a bf16 matrix product is fast here: a GPU that supports bf16, or a CPU with
    AVX-512 BF16 or AMX (elsewhere oneDNN emulates bf16 and it is slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def row_product_dtype(choice: str, device) -> torch.dtype:
    """[anchors] row_product: "fp32", "bf16", or "auto" (bf16 where `fast_bf16`)."""
    if choice == "auto":
        return torch.bfloat16 if fast_bf16(device) else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[choice]
