"""Checkpoints: round trip, pruning, milestones, crash safety, corruption, untrusted files."""

from __future__ import annotations

import collections
import errno
import hashlib
import os
import pickle
import random
import re
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from runners import checkpoint
from runners.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def wrap_in_header(body: bytes) -> bytes:
    """A file in the checkpoint format (written independently of the module): valid checksum."""
    digest = hashlib.sha256(body).digest()
    return struct.pack("<16sIIQ32s", b"DELTABEAST-CKPT\n", 1, 0, len(body), digest) + body


def payload(step: int) -> dict:
    return {"step": step, "weights": torch.full((4, 4), float(step))}


def run_child(code: str, env_extra: dict[str, str], timeout: float = 60) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and text, repr(text)
    return text


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_keeps_tensors_containers_and_types(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    data = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "counters": {"steps": 123, "updates": 4, "nested": {"list": [1, 2.5, None, True, "x"]}},
        "config": {"env": {"id": "pong"}, "learner": {"lr": 6e-4}},
        "shape": (2, 3),
        "ints": torch.arange(5, dtype=torch.int64),
    }
    path = tmp_path / "a.pt"
    save_checkpoint(path, data)
    back = load_checkpoint(path)
    assert isinstance(back["model"], collections.OrderedDict)
    for key, value in model.state_dict().items():
        assert torch.equal(back["model"][key], value)
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    for idx, state in opt.state_dict()["state"].items():
        for name, tensor in state.items():
            assert torch.equal(back["optimizer"]["state"][idx][name], tensor)
    assert back["counters"] == data["counters"]
    assert back["config"] == data["config"]
    assert back["shape"] == (2, 3)
    assert back["ints"].dtype == torch.int64 and back["ints"].tolist() == [0, 1, 2, 3, 4]
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    fresh.load_state_dict(back["optimizer"])  # usable as a real optimizer state


@pytest.mark.parametrize(
    ("bad", "where"),
    [
        ({"x": np.zeros(3)}, "payload['x']"),
        ({"a": {"b": [1, np.float64(2.0)]}}, "payload['a']['b'][1]"),
        ({"f": len}, "payload['f']"),
    ],
)
def test_save_rejects_values_the_safe_loader_would_refuse(tmp_path, bad, where):
    with pytest.raises(ValueError, match=r"^checkpoint " + re.escape(where)):
        save_checkpoint(tmp_path / "a.pt", bad)
    assert list(tmp_path.iterdir()) == []


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    def draw():
        return (
            torch.rand(3).tolist(),
            np.random.rand(3).tolist(),
            float(np.random.standard_normal()),
            random.random(),
            random.gauss(0, 1),
        )

    random.gauss(0, 1)  # leave a cached second normal in Python's and numpy's state
    np.random.standard_normal()
    save_checkpoint(tmp_path / "rng.pt", {"rng": capture_rng_state()})
    expected = draw()
    assert draw() != expected  # the generators moved on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draw() == expected


# --- manager: names, pruning, milestones -----------------------------------------------------


def test_manager_names_sort_and_pruning_keeps_last(tmp_path):
    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    for step in (5, 40, 300, 2000, 10_000):
        path = mgr.save(step, payload(step))
    assert path.name == "ckpt_000000010000.pt"
    assert [p.name for p in mgr.list()] == ["ckpt_000000002000.pt", "ckpt_000000010000.pt"]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "ckpt_000000002000.pt",
        "ckpt_000000010000.pt",
    ]
    loaded, where = mgr.load_latest()
    assert loaded["step"] == 10_000 and where == path


def test_milestones_are_first_save_at_or_after_and_never_pruned(tmp_path):
    directory = tmp_path / "ckpt"
    mgr = CheckpointManager(directory, keep_last=1, milestones=[250, 1000, 1100])
    for step in (100, 200, 300, 400):
        mgr.save(step, payload(step))
    assert [p.name for p in mgr.list_milestones()] == ["ckpt_000000000300.pt"]
    # a new manager (a resumed run) reads which milestones are honoured from disk
    mgr = CheckpointManager(directory, keep_last=1, milestones=[250, 1000, 1100])
    for step in (500, 1200, 1300):  # 1200 is the first save past both 1000 and 1100
        mgr.save(step, payload(step))
    assert [p.name for p in mgr.list_milestones()] == [
        "ckpt_000000000300.pt",
        "ckpt_000000001200.pt",
    ]
    assert [p.name for p in mgr.list()] == ["ckpt_000000001300.pt"]
    assert load_checkpoint(mgr.list_milestones()[0])["step"] == 300


def test_milestone_exactly_at_step_and_fallback_to_milestone(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1, milestones=[200])
    mgr.save(200, payload(200))
    mgr.save(300, payload(300))
    assert [p.name for p in mgr.list_milestones()] == ["ckpt_000000000200.pt"]
    mgr.list()[-1].write_bytes(b"junk")
    warnings: list[str] = []
    loaded, where = mgr.load_latest(log=warnings.append)
    assert loaded["step"] == 200 and where.parent.name == "milestones"
    assert len(warnings) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": 0}, "keep_last must be an integer >= 1"),
        ({"keep_last": 2.0}, "keep_last must be an integer >= 1"),
        ({"milestones": [-1]}, "milestones must be integers >= 0"),
    ],
)
def test_manager_rejects_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        CheckpointManager(tmp_path, **kwargs)


def test_load_latest_none_when_empty_and_error_when_all_corrupt(tmp_path):
    mgr = CheckpointManager(tmp_path / "missing")
    assert mgr.load_latest() is None
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, payload(1))
    mgr.save(2, payload(2))
    for path in mgr.list():
        path.write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match="all 2 are corrupt") as info:
        mgr.load_latest(log=lambda _: None)
    one_line(info.value)


# --- corruption --------------------------------------------------------------------------------


def corrupt_latest_and_fall_back(tmp_path: Path, damage, problem: str) -> None:
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(100, payload(100))
    latest = mgr.save(200, payload(200))
    damage(latest)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(latest)
    text = one_line(info.value)
    assert str(latest) in text and problem in text
    warnings: list[str] = []
    loaded, where = mgr.load_latest(log=warnings.append)
    assert loaded["step"] == 100 and where.name == "ckpt_000000000100.pt"
    assert len(warnings) == 1 and problem in warnings[0] and "\n" not in warnings[0]
    # the bad file is set aside: later saves and resumes no longer trip over it
    assert [p.name for p in mgr.list()] == ["ckpt_000000000100.pt"]
    assert latest.with_name(latest.name + ".corrupt").exists()


def test_truncated_checkpoint_detected_and_previous_used(tmp_path):
    def truncate(path):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])

    corrupt_latest_and_fall_back(tmp_path, truncate, "truncated")


def test_garbage_checkpoint_detected_and_previous_used(tmp_path):
    def garbage(path):
        path.write_bytes(os.urandom(path.stat().st_size))

    corrupt_latest_and_fall_back(tmp_path, garbage, "not a deltabeast checkpoint")


def test_flipped_byte_fails_checksum(tmp_path):
    def flip(path):
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    corrupt_latest_and_fall_back(tmp_path, flip, "checksum mismatch")


def test_missing_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="file not found") as info:
        load_checkpoint(tmp_path / "nope.pt")
    one_line(info.value)


# --- untrusted input ------------------------------------------------------------------------


def evil_body(container: str, marker: Path, scratch: Path) -> bytes:
    """Bytes that run ``touch marker`` when unpickled unsafely."""
    data = {"model": Evil(f"touch {marker}")}
    if container == "torch_zip":
        torch.save(data, scratch)
        return scratch.read_bytes()
    return pickle.dumps(data, protocol=int(container[-1]))


def unsafe_load(container: str, body: bytes, scratch: Path) -> None:
    if container == "torch_zip":
        scratch.write_bytes(body)
        torch.load(scratch, weights_only=False)
    else:
        pickle.loads(body)


@pytest.mark.parametrize(
    ("container", "named"), [("torch_zip", True), ("pickle_2", True), ("pickle_5", False)]
)
def test_malicious_pickle_is_refused_without_running(tmp_path, container, named):
    marker, control = tmp_path / "pwned", tmp_path / "control"
    scratch = tmp_path / "scratch.pt"
    unsafe_load(container, evil_body(container, control, scratch), scratch)
    assert control.exists()  # the payload is live: an unsafe load does run it
    body = evil_body(container, marker, scratch)

    bare = tmp_path / "bare.pt"  # as downloaded: no header at all
    bare.write_bytes(body)
    with pytest.raises(CheckpointError, match="not a deltabeast checkpoint") as info:
        load_checkpoint(bare)
    one_line(info.value)

    forged = tmp_path / "forged.pt"  # a valid header and checksum around the same payload
    forged.write_bytes(wrap_in_header(body))
    with pytest.raises(CheckpointError, match="refused") as info:
        load_checkpoint(forged)
    text = one_line(info.value)
    assert str(forged) in text
    assert ("posix.system" in text) == named
    assert not marker.exists()


# --- crash and disk faults ------------------------------------------------------------------


def test_kill_during_save_leaves_previous_checkpoint_latest(tmp_path):
    directory = tmp_path / "ckpt"
    mgr = CheckpointManager(directory)
    mgr.save(100, payload(100))
    child = run_child(
        f"""
        import torch
        from runners.checkpoint import CheckpointManager
        CheckpointManager({str(directory)!r}).save(200, {{"step": 200, "w": torch.ones(1000)}})
        print("finished")
        """,
        {checkpoint.PAUSE_ENV: "5"},
    )
    try:
        deadline = time.monotonic() + 60
        tmp_files: list[Path] = []
        while not tmp_files:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "child never started writing"
            time.sleep(0.05)
            tmp_files = [p for p in directory.iterdir() if p.name.startswith(".")]
        time.sleep(1.0)  # the write and fsync are done well within this; the pause is 5 s
        os.killpg(child.pid, signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
    finally:
        kill_group(child)
    assert child.returncode == -signal.SIGKILL and "finished" not in out
    assert not (directory / "ckpt_000000000200.pt").exists()
    assert [p.name for p in directory.iterdir() if p.name.startswith(".")] == [
        ".ckpt_000000000200.pt.tmp." + str(child.pid)
    ]
    assert [p.name for p in mgr.list()] == ["ckpt_000000000100.pt"]
    loaded, _ = mgr.load_latest()
    assert loaded["step"] == 100
    mgr.save(300, payload(300))  # the next save clears the orphan temp file
    assert sorted(p.name for p in directory.iterdir()) == [
        "ckpt_000000000100.pt",
        "ckpt_000000000300.pt",
    ]


def test_disk_full_during_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    mgr = CheckpointManager(tmp_path)
    mgr.save(100, payload(100))
    before = mgr.list()[0].read_bytes()
    real_write = os.write
    calls = []

    def write_then_fill_disk(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, data)  # the header lands, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", write_then_fill_disk)
    with pytest.raises(CheckpointError) as info:
        mgr.save(200, payload(200))
    monkeypatch.undo()
    text = one_line(info.value)
    assert "No space left on device" in text and "ckpt_000000000200.pt" in text
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000000100.pt"]
    assert mgr.list()[0].read_bytes() == before
    assert mgr.load_latest()[0]["step"] == 100


def test_file_size_limit_in_child_keeps_old_checkpoint(tmp_path):
    """A real failing write: RLIMIT_FSIZE makes the kernel refuse the big file (EFBIG)."""
    child = run_child(
        f"""
        import resource, signal, torch
        from runners.checkpoint import CheckpointError, CheckpointManager
        mgr = CheckpointManager({str(tmp_path)!r})
        mgr.save(100, {{"step": 100}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
        try:
            mgr.save(200, {{"step": 200, "w": torch.zeros(1 << 20)}})
        except CheckpointError as err:
            print("ERR", err)
        """,
        {},
    )
    try:
        out, err = child.communicate(timeout=60)
    finally:
        kill_group(child)
    assert child.returncode == 0, err
    assert out.startswith("ERR could not write checkpoint") and out.count("\n") == 1, out
    assert "File too large" in out
    mgr = CheckpointManager(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_000000000100.pt"]
    assert mgr.load_latest()[0]["step"] == 100


def test_bad_pause_setting_is_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint.PAUSE_ENV, "soon")
    with pytest.raises(ValueError, match=checkpoint.PAUSE_ENV):
        save_checkpoint(tmp_path / "a.pt", {"x": 1})
    assert list(tmp_path.iterdir()) == []
