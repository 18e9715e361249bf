"""When the fused Triton kernels serve a recurrence's ``impl="fast"`` path (CUDA only).

The kernels live in ``triton_<recurrence>.py`` modules, imported only when ``usable`` says yes,
so CPU-only installs never import triton. Their entry points take the recurrence's arguments
(without ``impl``) and also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check
them without a GPU).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable, Sequence

from torch import Tensor

from agents.cores.override import Override

HEAD_DIMS = (16, 32, 64)
_override = Override()
# Inside ``with forced(on):`` usable answers ``on`` whatever the tensor: the torch fast path on
# CUDA (benchmarks), or the kernels on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
forced = _override.forced


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(x: Tensor, head_dim: int | None = None) -> bool:
    """True when x, a recurrence input, is on CUDA, its head dim (``head_dim``, by default x's
    last dim) has kernels (16, 32 or 64) and triton is installed."""
    if _override.value is not None:
        return _override.value
    d = x.shape[-1] if head_dim is None else head_dim
    return x.is_cuda and d in HEAD_DIMS and triton_installed()


# core -> (kernel module, entry point reading the layer's raw slow projection in place)
_PROJECTED = {
    "lt": ("delta_rule", "linear_attention_projected"),
    "delta": ("delta_rule", "delta_rule_projected"),
    "delta_rnn": ("delta_rnn", "delta_rnn_projected"),
    "delta_lstm": ("delta_lstm", "delta_lstm_projected"),
    "rdn": ("rdn", "rdn_projected"),
}


def projected(kind: str, state_grad: str) -> Callable | None:
    """The kernels' entry point that reads a ``kind`` layer's raw slow projection in place and
    activates it (imports triton), or None where there is none: the linear rules' detached
    variant (a torch parallel form)."""
    if kind not in _PROJECTED or (kind in ("lt", "delta") and state_grad != "full"):
        return None
    module, entry = _PROJECTED[kind]
    return getattr(importlib.import_module(f"agents.cores.triton_{module}"), entry)


def projected_entry(function: type) -> Callable:
    """The ``*_projected`` entry point (``cpu_recurrences.delta_rnn_projected``'s arguments and
    result, and ``weights``: the recurrence's slow weights, rdn's R_q, R_k, R_v, r_b) over a
    kernels' autograd Function applied as ``(state_grad, activate, num_heads, done, P,
    *weights, *state)``, in f32."""

    def entry(
        P: Tensor,
        num_heads: int,
        done: Tensor,
        state: tuple[Tensor, ...],
        state_grad: str = "full",
        activate: bool = True,
        weights: tuple[Tensor, ...] = (),
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        floats = (x.float() for x in (*weights, *state))
        y, *final = function.apply(state_grad, activate, num_heads, done, P.float(), *floats)
        return y, tuple(final)

    return entry


def final_state_grads(
    grads: Sequence[Tensor | None], shapes: Sequence[Sequence[int]], like: Tensor
) -> tuple[list[Tensor], bool]:
    """The final state's gradients for a kernel's backward, and whether there are any.

    The kernels' autograd Functions leave unused outputs' gradients as None (the learner's loss
    never uses the final state), so when all are None the backward fills nothing and hands the
    kernel ``like`` as a placeholder it does not read; otherwise the missing ones are zeros.
    """
    if all(g is None for g in grads):
        return [like] * len(grads), False
    return [
        like.new_zeros(shape) if g is None else g.contiguous()
        for g, shape in zip(grads, shapes, strict=True)
    ], True
