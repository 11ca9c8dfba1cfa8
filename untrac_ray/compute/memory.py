"""What one actor holds in memory, as a formula of the model and the job's settings.

benchmarks/scale.py checks it against the measured peak of real actors; docs/benchmarks.md
states it.
For P parameters held in `b` bytes each (4: fp32, 2: resources.weights_dtype bf16):

- weights: P*b, one copy on the actor's device (resets copy the shared host arrays in);
- gradients: P*b;
- with NPO (`objective: npo`) or the KL term (`kl_weight` > 0), the frozen copy of the base
  model an unlearning task keeps beside the model it ascends (unlearning.frozen_base): P*b,
  during the task;
- optimizer state: Adam and AdamW 2*P*b, SGD 0, Adafactor its factored second moments
  (rows + columns of each matrix, the whole of each vector) in float32;
- with bf16 weights, the step itself (compute/optim.py, StochasticRounding): float32 copies of
  one parameter at a time, the largest of N weights: its weights, gradient, per-weight state
  (Adam 2, else 0), the random bits and the rounded result, (4 + state)*N*4 bytes, live after
  the backward pass has freed the activations;
- activations of one micro-batch of B rows of S tokens through L layers of width H with A
  heads, kept for the backward pass (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", per layer 34*S*B*H + 5*A*S^2*B bytes in 16-bit,
  doubled in float32), plus the float32 logits over a vocabulary of V, their softmax and
  gradient (3*B*S*V*4); with gradient checkpointing each layer keeps only its input (S*B*H*b)
  and one layer's activations are live at a time;
- on a CPU node, the weight sets read from the object store are shared memory the actor
  maps (P*4 each, once touched; counted in its resident set);
- a gradient task (GradDot, GradCos, TracIn) holds its gradients and their flat copy (P*b +
  P*4) instead of optimizer state, and maps the J test gradients it reads from the object store
  (J*P*4); like the weights, those pages stay in the actor's resident set once read, for the
  rest of its life (the first version of this formula counted them only during the gradient
  task; benchmarks/scale.py measured them staying);
- the runtime: the interpreter with torch, transformers and Ray's worker (measured, not
  modelled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BYTES = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Shape:
    """The sizes the activation term needs (from a transformers config)."""

    layers: int
    hidden: int
    heads: int
    vocab: int

    @classmethod
    def of(cls, config) -> Shape:
        get = config.to_dict().get
        layers = get("num_hidden_layers") or get("n_layer") or get("num_layers")
        hidden = get("hidden_size") or get("n_embd") or get("d_model")
        heads = get("num_attention_heads") or get("n_head") or get("num_heads")
        return cls(int(layers), int(hidden), int(heads), int(get("vocab_size")))


def optimizer_state_bytes(model: torch.nn.Module, optimizer: str, weight_bytes: int) -> int:
    """Bytes of optimizer state for the model's trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer in ("adam", "adamw"):
        return 2 * weight_bytes * sum(p.numel() for p in params)
    if optimizer == "sgd":
        return 0
    if optimizer == "adafactor":  # factored second moments, float32
        return 4 * sum(p.shape[-2] + p.shape[-1] if p.dim() >= 2 else p.numel() for p in params)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def rounding_bytes(model: torch.nn.Module, optimizer: str, weight_bytes: int) -> int:
    """Bytes of float32 copies a bf16 step holds at once (zero with float32 weights)."""
    if weight_bytes == 4:
        return 0
    largest = max((p.numel() for p in model.parameters() if p.requires_grad), default=0)
    state = 2 if optimizer in ("adam", "adamw") else 0
    return (4 + state) * largest * 4


def activation_bytes(shape: Shape, rows: int, tokens: int, weight_bytes: int,
                     checkpointing: bool = False) -> int:
    """Activations one micro-batch keeps for its backward pass (see the module docstring)."""
    scale = weight_bytes / 2  # the 16-bit figures, doubled in float32
    layer = (34 * tokens * rows * shape.hidden + 5 * shape.heads * tokens**2 * rows) * scale
    logits = 3 * rows * tokens * shape.vocab * 4
    if checkpointing:
        kept = shape.layers * tokens * rows * shape.hidden * weight_bytes
        return int(kept + layer + logits)
    return int(shape.layers * layer + logits)


@dataclass(frozen=True)
class ActorMemory:
    """The terms of the formula, in bytes; `total` adds the measured runtime to them."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    shared_weights: int
    shared_gradients: int  # the test gradients a gradient task read, mapped from then on
    gradient_task: int
    rounding: int = 0  # a bf16 step's float32 copies of one parameter (after the backward)
    base_copy: int = 0  # NPO's / the KL term's frozen base model, during an unlearning task

    def total(self, runtime: int = 0) -> int:
        """The peak: what stays (runtime, weights, mapped object-store pages) plus the larger
        of an unlearning step and a gradient task."""
        unlearning = (self.gradients + self.optimizer + self.base_copy
                      + max(self.activations, self.rounding))
        stays = runtime + self.weights + self.shared_weights + self.shared_gradients
        return stays + max(unlearning, self.gradient_task)


def actor_memory(model: torch.nn.Module, *, optimizer: str, rows: int, tokens: int,
                 weights_dtype: str = "fp32", checkpointing: bool = False,
                 weight_sets: int = 1, test_sets: int = 0, on_cpu: bool = True,
                 base_copy: bool = False) -> ActorMemory:
    """The formula for one actor studying `model` with the given settings.

    `rows` x `tokens`: the largest micro-batch an unlearning step runs; `weight_sets`: how many
    shared weight sets the actor reads (base, checkpoints); `test_sets`: J, the test gradients a
    gradient task reads (0: no gradient method); `base_copy`: an unlearning method keeps a
    frozen copy of the base model (needs_base_copy of its settings)."""
    b = BYTES[weights_dtype]
    p = sum(t.numel() for t in model.parameters())
    shape = Shape.of(model.config)
    return ActorMemory(
        weights=p * b,
        gradients=p * b,
        optimizer=optimizer_state_bytes(model, optimizer, b),
        activations=activation_bytes(shape, rows, tokens, b, checkpointing),
        shared_weights=weight_sets * p * 4 if on_cpu else 0,
        shared_gradients=test_sets * p * 4 if on_cpu else 0,
        gradient_task=(p * b + p * 4) if test_sets else 0,
        rounding=rounding_bytes(model, optimizer, b),
        base_copy=p * b if base_copy else 0,
    )


def needs_base_copy(settings) -> bool:
    """Whether unlearning with these settings (an UnlearnSpec) keeps a frozen copy of the base
    model: NPO's base losses and the KL term's base logits come from one."""
    return settings.objective == "npo" or settings.kl_weight > 0


MMAP_THRESHOLD = 1 << 20  # bytes: allocations this large get pages of their own


def return_freed_memory() -> bool:
    """Have glibc's malloc give large blocks pages of their own (mmap), returned to the system
    when freed. By default it raises that threshold as blocks are freed (up to 32 MiB), and
    the many tensors of a few MiB that a step allocates and frees then stay in the heap: the
    resident set grows past what the formula counts (measured: a bf16 actor of 85M parameters
    held 0.4 GB more). True when set (glibc on Linux), False elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False
