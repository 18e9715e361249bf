"""When the fused Triton kernels serve a recurrence's ``impl="fast"`` path (CUDA only).

The kernels live in ``triton_<recurrence>.py`` modules, imported only when ``usable`` says yes,
so CPU-only installs never import triton. Their entry points take the recurrence's arguments
(without ``impl``) and also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check
them without a GPU).
"""

from __future__ import annotations

import functools
import importlib.util

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


def usable(x: Tensor) -> bool:
    """True when x (a recurrence input, head dim last) is on CUDA, its head dim has kernels
    (16, 32 or 64) and triton is installed."""
    if _override.value is not None:
        return _override.value
    return x.is_cuda and x.shape[-1] in HEAD_DIMS and triton_installed()
