"""Numerics of the actors' forward passes: bf16 autocast and TF32 matmuls (spec options).

`resources.precision: bf16` runs every task of an actor under torch.autocast(bfloat16) (the
Workbench enters `precision_context` around each task; nothing patches the model, so copies
of it, such as the one kronfluence wraps, behave the same) while the weights, their pristine
copy, the optimizer state and the loss stay float32; `resources.tf32: true` lets CUDA matmuls
and convolutions use TF32. Both default off, and CPU runs stay float32 unless bf16 is asked
for (CPU supports bf16 autocast).
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    """`precision` itself, when it is one of PRECISIONS (ValueError otherwise)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def amp_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision: bfloat16 for bf16, None (no autocast) for fp32."""
    return torch.bfloat16 if check_precision(precision) == "bf16" else None


def precision_context(
    device: torch.device | str, precision: str
) -> contextlib.AbstractContextManager:
    """A context in which forward passes run in `precision`: bf16 is
    torch.autocast(device type, bfloat16) (matmuls in bf16, weights untouched), fp32 nothing."""
    dtype = amp_dtype(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def configure_tf32(enabled: bool, device: torch.device | str) -> None:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions of this process.

    Only on a CUDA device: CPU runs are left untouched.
    """
    if torch.device(device).type != "cuda":
        return
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        mode = "tf32" if enabled else "ieee"
        torch.backends.cuda.matmul.fp32_precision = mode
        torch.backends.cudnn.conv.fp32_precision = mode
    else:  # the older switches (deprecated from 2.9 on)
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled
