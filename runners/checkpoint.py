"""Crash-safe, code-free checkpoints for a run folder (DESIGN §6).

File format. A checkpoint is one file: a 64-byte header followed by the bytes that
``torch.save`` produced for the payload. The header holds a magic string, a format version,
the payload length and the payload's SHA-256, so a truncated, padded or bit-flipped file is
detected before anything is unpickled. Size and checksum live inside the file (no sidecar)
so that the single atomic rename publishes data and integrity record together, and a copied
checkpoint stays verifiable. The payload is loaded with ``torch.load(weights_only=True)``:
a checkpoint never executes code, even one whose checksum is valid (a checksum is not a
signature). Plain ``torch.load`` cannot read these files; use :func:`load_checkpoint`.

Atomicity. :func:`save_checkpoint` writes a hidden temp file in the target directory,
fsyncs it, renames it over the final name and fsyncs the directory. A crash at any moment
leaves either the old file or the complete new one under the final name; at worst an orphan
``.<name>.tmp.<pid>`` remains, which :class:`CheckpointManager` ignores and removes on its
next save (one writer per checkpoint directory is assumed).

Fault injection. If the environment variable ``DELTABEAST_CKPT_PAUSE_S`` is set, every save
sleeps that many seconds after the temp file is complete and before the rename, so a test
can kill the writer inside that window.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import logging
import os
import random
import re
import struct
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

PAUSE_ENV = "DELTABEAST_CKPT_PAUSE_S"

_MAGIC = b"DELTABEAST-CKPT\n"
_VERSION = 1
_HEADER = struct.Struct("<16sIIQ32s")  # magic, version, reserved, payload length, sha256
_CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
_TMP_RE = re.compile(r"^\.ckpt_\d+\.pt\.tmp\.\d+$")
_STEP_DIGITS = 12
_LEAF_TYPES = (str, bytes, int, float, bool, type(None), torch.dtype, torch.device)
_SEQ_TYPES = (list, tuple, torch.Size)
_MAP_TYPES = (dict, collections.OrderedDict)
_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)

_log = logging.getLogger(__name__)


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message is one user-facing line."""


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically, with its size and SHA-256 in the header.

    Raises ValueError if the payload holds anything ``weights_only`` loading would refuse,
    and CheckpointError (one line) if the file system fails; in that case the temp file is
    removed and whatever was under ``path`` before is untouched.
    """
    path = Path(path)
    if type(payload) not in _MAP_TYPES:
        raise ValueError(f"checkpoint payload must be a dict, got {type(payload).__name__}")
    _check_plain(payload, "payload")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getbuffer()
    header = _HEADER.pack(_MAGIC, _VERSION, 0, len(body), hashlib.sha256(body).digest())
    _atomic_write(path, (header, body), _pause_seconds())


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Verify and load a checkpoint written by :func:`save_checkpoint`, without running code."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: file not found") from None
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: cannot read: {err.strerror or err}") from None
    body = _verified_body(path, data)
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols: noise here
            warnings.simplefilter("ignore")
            payload = torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)
    except Exception as err:  # any unpickling failure means a bad checkpoint
        raise CheckpointError(f"checkpoint {path}: {_describe_load_error(err)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"checkpoint {path}: payload is a {type(payload).__name__}, expected a dict"
        )
    return payload


class CheckpointManager:
    """Numbered checkpoints in one directory: keep the last N plus milestone copies.

    Files are ``ckpt_<step>.pt`` with the step zero-padded to 12 digits. A milestone step M is
    honoured by the first checkpoint saved at a step >= M: that checkpoint is hard-linked
    (copied where links are unsupported) into ``milestones/`` and never pruned. Whether a
    milestone is already honoured is read from ``milestones/``, so it survives restarts.
    """

    def __init__(self, directory: Path, keep_last: int = 3, milestones: Iterable[int] = ()):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        steps = list(milestones)
        for m in steps:
            if isinstance(m, bool) or not isinstance(m, int) or m < 0:
                raise ValueError(f"milestones must be integers >= 0, got {m!r}")
        self.directory = Path(directory)
        self.milestone_dir = self.directory / "milestones"
        self.keep_last = keep_last
        self.milestones = sorted(set(steps))

    def path_for(self, step: int) -> Path:
        """The file name a checkpoint of ``step`` gets."""
        return self.directory / f"ckpt_{step:0{_STEP_DIGITS}d}.pt"

    def save(self, step: int, payload: dict) -> Path:
        """Save ``payload`` as the checkpoint of ``step``, then record milestones and prune."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {err.strerror or err}"
            ) from None
        self._remove_stale_tmp()
        path = self.path_for(step)
        save_checkpoint(path, payload)
        if self._due_milestones(step):
            self._keep_as_milestone(path)
        for old in self.list()[: -self.keep_last]:
            if old == path:  # only when a newer step already exists; never drop the new one
                continue
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        return path

    def list(self) -> list[Path]:
        """Regular checkpoints, oldest step first (temp and quarantined files excluded)."""
        return _scan(self.directory)

    def list_milestones(self) -> list[Path]:
        """Milestone checkpoints, oldest step first."""
        return _scan(self.milestone_dir)

    def load_latest(
        self, map_location: Any = "cpu", log: Callable[[str], None] | None = None
    ) -> tuple[dict, Path] | None:
        """Load the newest valid checkpoint; None when there is none at all.

        A corrupt one is reported through ``log`` (one line; default: a logging warning),
        renamed to ``<name>.corrupt`` so later saves and resumes skip it, and the next older
        one is tried, milestones included. Raises CheckpointError when every one is corrupt.
        """
        warn = log or _log.warning
        regular, kept = self.list(), self.list_milestones()
        candidates = sorted(
            [(_step_of(p), 1, p) for p in regular] + [(_step_of(p), 0, p) for p in kept],
            reverse=True,
        )
        if not candidates:
            return None
        for _, _, path in candidates:
            try:
                return load_checkpoint(path, map_location), path
            except CheckpointError as err:
                warn(f"{err}; skipping it")
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".corrupt"))
        raise CheckpointError(
            f"no loadable checkpoint in {self.directory}: all {len(candidates)} are corrupt"
        )

    def _due_milestones(self, step: int) -> bool:
        honoured = [_step_of(p) for p in self.list_milestones()]
        return any(m <= step and not any(h >= m for h in honoured) for m in self.milestones)

    def _keep_as_milestone(self, path: Path) -> None:
        """Hard-link ``path`` into ``milestones/`` (atomically; a copy where links fail)."""
        target = self.milestone_dir / path.name
        tmp = target.with_name(f".{target.name}.tmp.{os.getpid()}")
        try:
            self.milestone_dir.mkdir(exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            os.link(path, tmp)
            os.replace(tmp, target)
            _fsync_dir(self.milestone_dir)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            try:
                data = path.read_bytes()
            except OSError as err:
                raise CheckpointError(
                    f"could not keep milestone checkpoint {target}: {err.strerror or err}"
                ) from err
            _atomic_write(target, (data,), 0.0)

    def _remove_stale_tmp(self) -> None:
        for folder in (self.directory, self.milestone_dir):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if _TMP_RE.match(entry.name):
                        with contextlib.suppress(OSError):
                            entry.unlink()


def capture_rng_state() -> dict:
    """Torch (CPU and CUDA), numpy's legacy global and Python ``random`` state as plain data."""
    np_state = np.random.get_state(legacy=False)
    py_version, py_internal, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(k) for k in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA state only where CUDA is available)."""
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_internal), py_gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _verified_body(path: Path, data: bytes) -> memoryview:
    """The payload bytes of ``data`` after checking magic, version, length and checksum."""
    if len(data) < _HEADER.size or not data.startswith(_MAGIC):
        raise CheckpointError(f"checkpoint {path}: not a deltabeast checkpoint (bad header)")
    _, version, _, length, digest = _HEADER.unpack_from(data)
    if version != _VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version} is not supported (expected {_VERSION})"
        )
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length:
        problem = "truncated" if len(body) < length else "has trailing bytes"
        raise CheckpointError(
            f"checkpoint {path}: {problem} ({len(body)} payload bytes, header says {length})"
        )
    if hashlib.sha256(body).digest() != digest:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch (file is corrupt)")
    return body


def _describe_load_error(err: Exception) -> str:
    """One line for a failed weights-only load (torch's own message spans many lines)."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"refused: it references {found.group(1)}, which a checkpoint may not contain"
    if "Weights only load failed" in text:
        return "refused by the weights-only loader (not plain tensors and containers)"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"cannot be loaded: {first}"


def _check_plain(value: Any, where: str) -> None:
    """Raise ValueError naming the first value that weights-only loading would refuse."""
    kind = type(value)
    if kind in _TENSOR_TYPES or kind in _LEAF_TYPES:
        return
    if kind in _MAP_TYPES:
        for key, item in value.items():
            if type(key) not in _LEAF_TYPES:
                raise ValueError(f"checkpoint {where} has a key of type {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if kind in _SEQ_TYPES:
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise ValueError(
        f"checkpoint {where} is a {kind.__module__}.{kind.__qualname__}; allowed: tensors, "
        "dict, list, tuple, str, bytes, int, float, bool, None, torch dtype/device/Size"
    )


def _atomic_write(path: Path, chunks: Iterable[bytes | memoryview], pause_s: float) -> None:
    """Temp file in the same directory, fsync, optional pause, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        if pause_s:
            time.sleep(pause_s)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CheckpointError(f"could not write checkpoint {path}: {err.strerror or err}") from err


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pause_seconds() -> float:
    raw = os.environ.get(PAUSE_ENV)
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"{PAUSE_ENV} must be a number of seconds >= 0, got {raw!r}")
    return value


def _step_of(path: Path) -> int:
    return int(_CKPT_RE.match(path.name).group(1))


def _scan(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _CKPT_RE.match(p.name) and p.is_file()]
    return sorted(found, key=_step_of)
