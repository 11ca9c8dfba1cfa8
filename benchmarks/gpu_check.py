"""UnTrac's two kernels on one GPU: gradient-ascent unlearning and evaluation of a GPT-style model.

Reports tokens per second for each, the model FLOP rate they reach (6 x parameters x tokens for
a training step, 2 x parameters x tokens for evaluation, attention not counted) and that rate as
a fraction of a plain matmul measured on the same device in the same precision: how close the
loops get to what the hardware does here.

It uses the project's own pieces: `unlearning.unlearn` (the loop the actors run) and
`evaluation.mean_loss` on a `TokenizedSet`, with the actors' precision options
(`precision.precision_context` for bf16, as the Workbench runs tasks, and
`precision.configure_tf32`).

    .venv/bin/python benchmarks/gpu_check.py                 # GPT-2 small (124M), bf16, on cuda
    .venv/bin/python benchmarks/gpu_check.py --precision fp32 --tf32
    .venv/bin/python benchmarks/gpu_check.py --smoke         # tiny model, seconds, CPU is fine

Prints one line per measure and a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from untrac_ray.compute.evaluation import mean_loss
from untrac_ray.compute.modeling import build_model, config_from_dict
from untrac_ray.compute.precision import configure_tf32, precision_context
from untrac_ray.compute.unlearning import unlearn
from untrac_ray.inputs.spec_methods import UnlearnSpec
from untrac_ray.inputs.tokenization import TokenizedSet

SIZES = {  # GPT-2 small is OPT-125M's size class
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768},
    "smoke": {"n_layer": 2, "n_head": 2, "n_embd": 64},
}


def synthetic_set(rows: int, length: int, vocab: int, seed: int = 0) -> TokenizedSet:
    """Rows of random tokens, every token labelled (a packed text set)."""
    ids = np.random.default_rng(seed).integers(1, vocab, size=rows * length, dtype=np.int64)
    offsets = np.arange(0, rows * length + 1, length, dtype=np.int64)
    return TokenizedSet("synthetic", ids, offsets, pad_id=0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """FLOP/s of an n x n matmul on this device in this dtype (best of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and data (CPU is fine)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda, cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls (fp32 on CUDA)")
    parser.add_argument("--seq", type=int, help="tokens per row (default 512; smoke 64)")
    parser.add_argument("--batch", type=int, help="rows per step (default 16; smoke 4)")
    parser.add_argument("--steps", type=int, help="unlearning steps timed (default 30; smoke 3)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    smoke = args.smoke
    seq = args.seq or (64 if smoke else 512)
    batch = args.batch or (4 if smoke else 16)
    steps = args.steps or (3 if smoke else 30)
    vocab = 512 if smoke else 50257
    shape = SIZES["smoke" if smoke else "gpt2-small"]
    configure_tf32(args.tf32, device)

    config = config_from_dict({"model_type": "gpt2", "n_positions": seq, "resid_pdrop": 0.0,
                               "embd_pdrop": 0.0, "attn_pdrop": 0.0, **shape}, vocab_size=vocab,
                              eos_id=0)
    model = build_model(config, seed=0).to(device)
    params = sum(p.numel() for p in model.parameters())
    data = synthetic_set(batch * (steps + 1) * 2, seq, vocab)
    rows = np.arange(min(len(data), batch * 8))

    with precision_context(device, args.precision):  # as the Workbench runs tasks
        # warm-up (kernels, allocator), untimed
        unlearn(model, data, UnlearnSpec(optimizer="adam", learning_rate=1e-6, batch_size=batch,
                                         max_steps=2), [], lambda step: None, device)
        mean_loss(model, data, rows[:batch], batch, device)

        settings = UnlearnSpec(optimizer="adam", learning_rate=1e-6, batch_size=batch,
                               max_steps=steps, seed=1)
        sync(device)
        start = time.perf_counter()
        unlearn(model, data, settings, [], lambda step: None, device)
        sync(device)
        unlearn_s = time.perf_counter() - start
        unlearn_tokens = steps * batch * seq

        sync(device)
        start = time.perf_counter()
        loss = mean_loss(model, data, rows, batch, device)
        sync(device)
        eval_s = time.perf_counter() - start
        eval_tokens = len(rows) * seq

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_rate(device, dtype, 512 if smoke or device.type == "cpu" else 8192,
                       repeats=3 if smoke else 10)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision, "tf32": args.tf32, "parameters": params,
        "seq": seq, "batch": batch, "steps": steps,
        "unlearn_tokens_per_s": unlearn_tokens / unlearn_s,
        "eval_tokens_per_s": eval_tokens / eval_s,
        "unlearn_flops": 6 * params * unlearn_tokens / unlearn_s,
        "eval_flops": 2 * params * eval_tokens / eval_s,
        "matmul_flops": peak, "eval_loss": loss,
    }
    report["unlearn_fraction_of_matmul"] = report["unlearn_flops"] / peak
    report["eval_fraction_of_matmul"] = report["eval_flops"] / peak
    print(f"{report['device']}, {args.precision}{' +tf32' if args.tf32 else ''}, "
          f"{params / 1e6:.1f}M parameters, {batch} x {seq} tokens", file=sys.stderr)
    for kind in ("unlearn", "eval"):
        print(f"{kind:>8}: {report[f'{kind}_tokens_per_s']:>12,.0f} tokens/s  "
              f"{report[f'{kind}_flops'] / 1e12:8.2f} TFLOP/s  "
              f"{report[f'{kind}_fraction_of_matmul']:6.1%} of the matmul rate", file=sys.stderr)
    print(f"  matmul: {peak / 1e12:8.2f} TFLOP/s ({args.precision})", file=sys.stderr)
    if not np.isfinite(loss):
        raise SystemExit("the evaluation loss is not finite")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
