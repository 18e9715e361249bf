"""When the fused Triton kernels serve a recurrence's ``impl="fast"`` path (CUDA only).

The kernels live in ``triton_<recurrence>.py`` modules, imported only when ``usable`` says yes,
so CPU-only installs never import triton. Their entry points take the recurrence's arguments
(without ``impl``) and also run on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests check
them without a GPU).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator

from torch import Tensor

HEAD_DIMS = (16, 32, 64)
_forced: bool | None = None


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def usable(x: Tensor) -> bool:
    """True when x (a recurrence input, head dim last) is on CUDA, its head dim has kernels
    (16, 32 or 64) and triton is installed."""
    if _forced is not None:
        return _forced
    return x.is_cuda and x.shape[-1] in HEAD_DIMS and triton_installed()


@contextlib.contextmanager
def forced(on: bool) -> Iterator[None]:
    """Inside the block ``usable`` answers ``on`` whatever the tensor: the torch fast path on
    CUDA (benchmarks), or the kernels on CPU tensors under ``TRITON_INTERPRET=1`` (tests)."""
    global _forced
    before, _forced = _forced, on
    try:
        yield
    finally:
        _forced = before
