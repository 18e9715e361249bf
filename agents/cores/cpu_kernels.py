"""The fused C kernels of ``csrc/fwp_cpu.c``: built on first use, loaded with ctypes.

The source is compiled once per machine with the system C compiler (``$CC``, default ``cc``;
``FLAGS``) into ``$XDG_CACHE_HOME/deltabeast`` (default ``~/.cache``), under a name that hashes
the source, the flags, the compiler and the CPU, so an edit, another compiler or another
machine never loads a stale build; a new build removes those not loaded for a month. No torch
headers are involved, so the build takes about a second. Where it cannot be built (no compiler)
or is switched off with ``DELTABEAST_CPU_KERNELS=0``, ``usable`` says no after one warning and
the torch fast paths serve.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from agents.cores.override import Override

SOURCE = Path(__file__).with_name("csrc") / "fwp_cpu.c"
# -fno-trapping-math lets gcc if-convert the float comparisons in fast_exp's clamp and in φ, and
# so vectorise the activation loops, which under trapping math stay scalar (docs/benchmarks.md,
# 2026-12-07). Nothing here enables floating-point traps.
FLAGS = (
    "-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-std=gnu11", "-shared", "-fPIC",
)  # fmt: skip
SWITCH = "DELTABEAST_CPU_KERNELS"
CORES = ("lt", "delta", "rdn", "delta_rnn", "delta_lstm")  # the cores the kernels serve
MAX_HEAD_DIM = 128  # a program's per-step vectors live on its thread's stack (up to 26d floats)
STALE_S = 30 * 24 * 3600  # a new build removes builds unused for this long (old sources)
_override = Override()
# Inside ``with forced(on):`` usable answers ``on``: the tests and benchmarks use it to run the
# torch fast paths on a machine where the kernels are built.
forced = _override.forced
log = logging.getLogger(__name__)


def _cpu_signature() -> str:
    """The CPU's model and feature flags: a build with -march=native is only valid there."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [ln for ln in lines if ln.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted))) or platform.machine()


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deltabeast"


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *FLAGS, version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"fwp_cpu-{key}.so"
    if target.exists():
        with contextlib.suppress(OSError):  # a read-only cache still serves
            os.utime(target)  # in use: _prune_stale leaves it alone
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent first uses (actor processes) each build their own file; the rename is atomic.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", tmp, "-lm"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise OSError(f"{compiler} failed: {last}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _prune_stale(target)
    return target


def _prune_stale(keep: Path) -> None:
    """Remove the builds (of earlier sources, say) that nothing has loaded for STALE_S: every
    edit of the C source leaves one behind. A process that has one mapped keeps its copy."""
    cutoff = time.time() - STALE_S
    for old in keep.parent.glob("fwp_cpu-*.so"):
        with contextlib.suppress(OSError):  # another process may prune it at the same time
            if old != keep and old.stat().st_mtime < cutoff:
                old.unlink()


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (with one warning saying why) when they cannot be had."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    try:
        path = _build()
        # torch's libgomp is already loaded under the same soname, so the kernels use its pool.
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"fused CPU kernels unavailable ({e}); the torch fast paths serve instead "
            f"(set {SWITCH}=0 to skip the build)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    log.info("fused CPU kernels: %s", path)
    return lib


def usable(x: Tensor, head_dim: int | None = None) -> bool:
    """True when x, a recurrence input, is a float32 CPU tensor, its head dim (``head_dim``, by
    default x's last dim) is at most MAX_HEAD_DIM and the kernels are built."""
    if _override.value is not None:
        return _override.value
    cpu_f32 = x.device.type == "cpu" and x.dtype == torch.float32
    d = x.shape[-1] if head_dim is None else head_dim
    return cpu_f32 and d <= MAX_HEAD_DIM and library() is not None
