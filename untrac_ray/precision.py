"""Numerics of the actors' forward passes: bf16 autocast and TF32 matmuls (spec options).

`resources.precision: bf16` runs every forward pass of an actor's model under
torch.autocast(bfloat16) while the weights, their pristine copy, the optimizer state and the
loss stay float32; `resources.tf32: true` lets CUDA matmuls and convolutions use TF32. Both
default off, and CPU runs stay float32 unless bf16 is asked for (CPU supports bf16 autocast).
"""

from __future__ import annotations

import functools

import torch

PRECISIONS = ("fp32", "bf16")


def autocast_forward(model: torch.nn.Module, device: torch.device | str, precision: str) -> None:
    """Make `model`'s forward run under bf16 autocast (fp32: leave it as it is)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "fp32" or getattr(model, "_untrac_autocast", None) == precision:
        return
    device_type = torch.device(device).type
    forward = model.forward

    @functools.wraps(forward)
    def bf16_forward(*args, **kwargs):
        with torch.autocast(device_type=device_type, dtype=torch.bfloat16):
            return forward(*args, **kwargs)

    model.forward = bf16_forward
    model._untrac_autocast = precision


def configure_tf32(enabled: bool, device: torch.device | str) -> None:
    """Allow (or forbid) TF32 in CUDA matmuls and cuDNN convolutions of this process.

    Only on a CUDA device: CPU runs are left untouched.
    """
    if torch.device(device).type != "cuda":
        return
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
