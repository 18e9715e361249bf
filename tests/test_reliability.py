"""Issue 6 end to end: faults provoked in real train.py / evaluate.py processes.

Crash and disk faults during checkpoint saves, untrusted checkpoints through both CLIs, a
non-finite reward from the env, killed actors and signals at several moments, network exposure
and secrets, and a table-driven sweep of bad input over every config key. Every process a test
starts is killed in a `finally` block; "no orphans" is checked with psutil.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch
import yaml

from runners.checkpoint import PAUSE_ENV, CheckpointManager, load_checkpoint
from runners.config import Config, ConfigError, build_config
from runners.factory import probe_env
from tests.test_checkpoint import Evil, wrap_in_header

ROOT = Path(__file__).resolve().parent.parent
TINY = [
    "env.kind=gym",
    "env.id=deltabeast-test/Counting-v0",
    "env.module=tests.counting_env",
    "env.num_envs=4",
    "agent.torso=mlp",
    "agent.core=lstm",
    "core.hidden_size=16",
    "learner.unroll_length=5",
    "learner.batch_size=4",
    "runtime.num_actors=2",
    "runtime.total_steps=100000000",
    "logging.every_s=1",
    "logging.tensorboard=false",
]
TMP_RE = re.compile(r"^\.ckpt_(\d+)\.pt\.tmp\.\d+$")
LOOPBACK = {"127.0.0.1", "::1"}


# --- helpers ----------------------------------------------------------------------------------


class Train:
    """A train.py process with its output in a file and every descendant it ever had."""

    def __init__(
        self, run: Path, args: list[str], env: dict[str, str] | None, out: Path | None
    ) -> None:
        self.run = run
        self.out_path = out or run.parent / f"{run.name}.out"
        with open(self.out_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "train.py", *TINY, f"run.dir={run}", *args],
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **(env or {})),
            )
        self.seen: dict[int, psutil.Process] = {}

    def descendants(self) -> list[psutil.Process]:
        """The current descendants (remembered, so they can be checked after the parent dies)."""
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        return list(self.seen.values())

    def actors(self) -> list[psutil.Process]:
        found = []
        for child in self.descendants():
            with contextlib.suppress(psutil.Error):
                if child.is_running() and "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
        return found

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def log(self) -> str:
        path = self.run / "train.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_until(self, condition: Callable[[], object], timeout: float, what: str) -> object:
        """Poll `condition` (also refreshing descendants) until it is truthy."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.descendants()
            value = condition()
            if value:
                return value
            if self.proc.poll() is not None:
                pytest.fail(
                    f"train.py exited ({self.proc.returncode}) before {what}:\n"
                    f"{self.output()[-3000:]}"
                )
            time.sleep(0.05)
        pytest.fail(f"timed out waiting for {what}:\n{self.output()[-3000:]}")

    def finish(self, timeout: float = 30) -> int:
        self.proc.wait(timeout)
        return self.proc.returncode

    def kill_all(self) -> None:
        self.descendants()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for child in self.seen.values():
            with contextlib.suppress(psutil.Error):
                child.kill()


@contextlib.contextmanager
def training(
    run: Path, *args: str, env: dict[str, str] | None = None, out: Path | None = None
) -> Iterator[Train]:
    """Start train.py on `run`; its console output goes to `out` (default: beside `run`)."""
    train = Train(run, list(args), env, out)
    try:
        yield train
    finally:
        train.kill_all()


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120):
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, **(env or {})),
    )


def assert_no_orphans(procs: list[psutil.Process], timeout: float = 5.0) -> None:
    """Every process in `procs` is gone (or a zombie) within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.Error):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def checkpoints(run: Path) -> list[Path]:
    return CheckpointManager(run / "checkpoints").list()


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split(".")[0])


def temp_files(run: Path) -> list[Path]:
    folder = run / "checkpoints"
    return [p for p in folder.iterdir() if TMP_RE.match(p.name)] if folder.is_dir() else []


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def all_finite(tree: object) -> bool:
    if isinstance(tree, torch.Tensor):
        return bool(torch.isfinite(tree).all()) if tree.is_floating_point() else True
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(all_finite(v) for v in tree)
    return True


# --- 1. crash-safe checkpoints through the real trainer ---------------------------------------


@pytest.mark.timeout(120)
def test_kill9_during_save_keeps_previous_and_resume_picks_it_up(tmp_path):
    run = tmp_path / "run"
    with training(run, "checkpoint.every_s=1", env={PAUSE_ENV: "2"}) as train:
        first = train.wait_until(lambda: checkpoints(run), 60, "a first checkpoint")[-1]
        train.wait_until(
            lambda: [p for p in temp_files(run) if int(TMP_RE.match(p.name)[1]) > step_of(first)],
            30,
            "a second save in progress",
        )
        children = train.descendants()
        assert len(train.actors()) == 2
        train.proc.send_signal(signal.SIGKILL)
        assert train.finish(10) == -signal.SIGKILL
        assert_no_orphans(children)  # PR_SET_PDEATHSIG / pipe EOF take the actors down
    assert checkpoints(run) == [first]  # the interrupted save never became "latest"
    assert temp_files(run)  # its temp file is left behind, under a name nothing loads
    steps = load_checkpoint(first)["steps"]
    out = cli(
        "train.py", f"run.dir={run}", "runtime.backend=sync", f"runtime.total_steps={steps + 40}"
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from {first} at step {steps}" in out.stderr
    assert not temp_files(run)  # the next save cleared the orphan
    assert load_checkpoint(checkpoints(run)[-1])["steps"] == steps + 40


def _mount_tmpfs(where: Path, size: str) -> None:
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")


def _fill(folder: Path) -> Path:
    """Fill the file system of `folder` to the last byte with one file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:
        chunk = b"\0" * 65536
        with contextlib.suppress(OSError):
            while chunk:
                written = f.write(chunk)
                chunk = chunk[written:] or b"\0" * 65536
    return filler


@pytest.mark.timeout(120)
def test_disk_full_is_reported_and_training_goes_on(tmp_path):
    """The run's file system fills up completely: the checkpoint save and TensorBoard fail
    with one error line each, nothing half-written stays, training goes on, and once space is
    back the next checkpoint is saved."""
    mnt = tmp_path / "mnt"
    _mount_tmpfs(mnt, "8m")
    run = mnt / "run"
    try:
        args = ("checkpoint.every_s=1", "logging.tensorboard=true")
        with training(run, *args, out=tmp_path / "console.out") as train:
            first = train.wait_until(lambda: checkpoints(run), 60, "a first checkpoint")[-1]
            filler = _fill(mnt)
            for text in ("checkpoint not saved", "TensorBoard summaries off"):
                train.wait_until(lambda t=text: t in train.output(), 30, f"'{text}'")
            output = train.output()
            line = next(x for x in output.splitlines() if "checkpoint not saved" in x)
            assert "No space left on device" in line and "previous one is kept" in line
            assert not temp_files(run)  # nothing half-written left behind
            for path in checkpoints(run):
                load_checkpoint(path)
            filler.unlink()  # space again: training went on, so the next save succeeds
            newer = train.wait_until(
                lambda: [p for p in checkpoints(run) if step_of(p) > step_of(first) + 100],
                30,
                "a checkpoint after the disk was freed",
            )
            assert load_checkpoint(newer[-1])["steps"] == step_of(newer[-1])
            train.proc.send_signal(signal.SIGTERM)
            assert train.finish() == 0, train.output()[-2000:]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


# --- 2. untrusted checkpoints through both CLIs -----------------------------------------------


def _plant_malicious(path: Path, marker: Path) -> None:
    scratch = path.with_suffix(".scratch")
    evil = {"format": 1, "steps": 10**6, "agent": Evil(f"touch {marker}"), "config": {}}
    torch.save(evil, scratch)
    path.write_bytes(wrap_in_header(scratch.read_bytes()))  # header and checksum are valid
    scratch.unlink()


@pytest.mark.timeout(120)
def test_malicious_checkpoint_never_runs_in_evaluate_or_resume(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    base = ["train.py", *TINY, f"run.dir={run}", "runtime.backend=sync"]
    assert cli(*base, "runtime.total_steps=40").returncode == 0
    good = checkpoints(run)[-1]
    evil = run / "checkpoints" / "ckpt_000001000000.pt"  # the newest: resume tries it first
    _plant_malicious(evil, marker)

    out = cli("evaluate.py", str(evil), "--episodes", "1", "--num-envs", "1")
    assert out.returncode == 2
    assert "refused: it references posix.system" in one_line(out.stderr)
    assert not marker.exists()

    out = cli(*base, "runtime.total_steps=80")
    assert out.returncode == 0, out.stderr[-2000:]
    refused = [x for x in out.stderr.splitlines() if "posix.system" in x]
    assert len(refused) == 1 and "skipping it" in refused[0]
    assert f"resumed from {good} at step 40" in out.stderr
    assert not marker.exists()
    assert evil.with_name(evil.name + ".corrupt").exists()  # quarantined, not tried again


# --- 3. numerical faults end to end -----------------------------------------------------------


@pytest.mark.timeout(120)
def test_nonfinite_rewards_skip_updates_then_stop_with_a_good_checkpoint(tmp_path):
    """An env that starts returning +inf (the agent's input clamps it; the learner, with
    reward_clip=0, does not): every update is skipped and logged, and after
    max_nan_updates in a row the run stops with exit 1 and a loadable, finite checkpoint."""
    run = tmp_path / "run"
    kwargs = "env.kwargs={length: 7, bad_reward_at: 40, bad_reward: .inf}"
    out = cli(
        "train.py",
        *TINY,
        f"run.dir={run}",
        kwargs,
        "learner.reward_clip=0",
        "learner.max_nan_updates=3",
    )
    assert out.returncode == 1, out.stderr[-2000:]
    log = (run / "train.log").read_text()
    skipped = re.findall(r"update skipped \((\d) in a row\)", log)
    assert skipped[-3:] == ["1", "2", "3"]
    assert "3 non-finite updates in a row; stopping" in log
    payload = load_checkpoint(checkpoints(run)[-1])
    assert payload["learner"]["updates"] >= 1 and payload["learner"]["skipped_updates"] >= 3
    assert all_finite(payload["agent"]) and all_finite(payload["learner"]["optimizer"])


# --- 4. process faults through train.py -------------------------------------------------------


@pytest.mark.timeout(120)
def test_killed_actor_is_restarted_and_sigterm_then_stops_cleanly(tmp_path):
    run = tmp_path / "run"
    with training(run, "checkpoint.every_s=1") as train:
        first = train.wait_until(lambda: checkpoints(run), 60, "a first checkpoint")[-1]
        victim = train.actors()[0]
        victim.kill()
        train.wait_until(lambda: "restarting it" in train.log(), 30, "the actor's restart")
        train.wait_until(lambda: len(train.actors()) == 2, 30, "a new actor")
        train.wait_until(
            lambda: [p for p in checkpoints(run) if step_of(p) > step_of(first) + 100],
            60,
            "training to go on after the restart",
        )
        children = train.descendants()
        train.proc.send_signal(signal.SIGTERM)
        assert train.finish() == 0, train.output()[-2000:]
        assert "SIGTERM received: stopping" in train.log()
        assert_no_orphans(children)
    assert load_checkpoint(checkpoints(run)[-1])["steps"] > step_of(first)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("signum", "moment"),
    [(signal.SIGINT, "startup"), (signal.SIGTERM, "save")],
)
def test_signal_at_startup_or_during_a_save_exits_cleanly(tmp_path, signum, moment):
    """`startup`: as soon as the run is logged, while the actors are still being spawned;
    `save`: while a checkpoint is being written (paused between write and rename)."""
    run = tmp_path / "run"
    with training(run, "checkpoint.every_s=1", env={PAUSE_ENV: "2"}) as train:
        if moment == "startup":
            train.wait_until(lambda: "run " in train.log(), 60, "the run to start")
            in_flight = None
        else:
            in_flight = train.wait_until(lambda: temp_files(run), 60, "a save in progress")[0]
        children = train.descendants()
        start = time.monotonic()
        train.proc.send_signal(signum)
        assert train.finish() == 0, train.output()[-2000:]
        assert time.monotonic() - start < 20
        assert f"{signal.Signals(signum).name} received: stopping" in train.log()
        assert_no_orphans(children)
    saved = checkpoints(run)
    assert saved and not temp_files(run)
    if in_flight is None:  # stopped at startup: one final checkpoint, at most a batch or two in
        # (whether the first rollouts arrive before the signal is handled is a race)
        assert len(saved) == 1 and step_of(saved[0]) <= 2 * 5 * 4  # two batches of T=5 × B=4
    else:  # the save under way completed, then the final one
        assert step_of(saved[-1]) >= int(TMP_RE.match(in_flight.name)[1])
    load_checkpoint(saved[-1])


def test_sigterm_before_the_trainer_is_up_writes_nothing(tmp_path):
    """While Python is still importing, the default action ends the process: nothing written."""
    run = tmp_path / "run"
    with training(run) as train:
        time.sleep(0.3)
        train.proc.send_signal(signal.SIGTERM)
        assert train.finish() == -signal.SIGTERM
        assert_no_orphans(train.descendants())
    assert not run.exists()


# --- 7. network exposure and secrets ----------------------------------------------------------


def _exposed_sockets(procs: list[psutil.Process]) -> list[tuple]:
    """Listening TCP or bound UDP sockets of `procs` on a non-loopback address."""
    exposed = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            for conn in p.net_connections(kind="inet"):
                listening = conn.status == psutil.CONN_LISTEN or conn.status == psutil.CONN_NONE
                if listening and conn.laddr and conn.laddr.ip not in LOOPBACK:
                    exposed.append((p.pid, p.name(), conn.laddr))
    return exposed


@pytest.mark.timeout(120)
def test_nothing_listens_beyond_loopback_and_no_secret_reaches_disk(tmp_path):
    run = tmp_path / "run"
    secrets = {"DELTABEAST_TEST_TOKEN": "s3cr3t-9f1c2e7a", "AWS_SECRET_ACCESS_KEY": "AKx7Qp2Lw0"}
    with training(run, "checkpoint.every_s=1", "logging.tensorboard=true", env=secrets) as train:
        train.wait_until(lambda: checkpoints(run), 60, "a first checkpoint")
        procs = [psutil.Process(train.proc.pid), *train.descendants()]
        assert len(procs) >= 3
        for _ in range(5):
            assert not _exposed_sockets(procs)
            time.sleep(0.2)
        train.proc.send_signal(signal.SIGTERM)
        assert train.finish() == 0
    out = cli("evaluate.py", str(run), "--episodes", "2", "--num-envs", "2", env=secrets)
    assert out.returncode == 0, out.stderr[-2000:]
    assert list((run / "eval").glob("*.json"))
    needles = [v.encode() for v in secrets.values()] + [os.environ["PATH"].encode()]
    files = [p for p in run.rglob("*") if p.is_file()]
    assert len(files) >= 5
    leaks = [(p.name, n) for p in files for n in needles if n in p.read_bytes()]
    assert not leaks


# --- 6. bad input sweep -----------------------------------------------------------------------


def _key_fields() -> list[tuple[str, tuple[type, ...], dataclasses.Field]]:
    """(dotted key, accepted types, field) for every config key, read from the dataclasses."""
    rows = []
    for section in dataclasses.fields(Config):
        if section.name == "seed":
            owner, fields, prefix = Config, [section], ""
        else:
            owner = section.default_factory
            fields, prefix = dataclasses.fields(owner), f"{section.name}."
        hints = typing.get_type_hints(owner)
        for f in fields:
            hint = hints[f.name]
            bases = (hint,)
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                bases = tuple(a for a in typing.get_args(hint) if a is not type(None))
            rows.append((prefix + f.name, bases, f))
    return rows


WRONG_TYPE = {int: "abc", float: "abc", str: "5", bool: "maybe", dict: "[1, 2]", list: "abc"}


def _bad_values() -> dict[str, tuple[str, str]]:
    """id -> (override, expected text): a wrong type for every key, below the minimum where
    there is one, NaN for floats, an unknown choice where there are choices."""
    cases = {}
    for key, bases, f in _key_fields():
        base = bases[0]
        wrong = next(
            WRONG_TYPE[b] for b in bases if not isinstance(yaml.safe_load(WRONG_TYPE[b]), bases)
        )
        cases[f"{key}:type"] = (f"{key}={wrong}", "must be")
        minimum = f.metadata.get("min")
        if minimum is not None:
            below = minimum - 1 if base is int else minimum - 0.5
            cases[f"{key}:min"] = (f"{key}={below}", f"must be >= {minimum}")
        if base is float:
            cases[f"{key}:nan"] = (f"{key}=.nan", "must be a number")
        if f.metadata.get("choices"):
            spelled = [yaml.safe_dump(c).splitlines()[0] for c in f.metadata["choices"]]
            cases[f"{key}:choice"] = (f"{key}=nope", "choices: " + ", ".join(spelled))
    cases["milestone<0"] = ("checkpoint.milestones=[10, -5]", "list of integers >= 0")
    cases["unknown key"] = ("env.idd=pong", "did you mean env.id")
    cases["unknown section"] = ("nosuch.key=1", "unknown config key 'nosuch.key'")
    cases["section only"] = ("learner=1", "unknown config key 'learner'")
    cases["not key=value"] = ("learner.gamma", "is not of the form section.key=value")
    cases["num_envs per actor"] = ("env.num_envs=5", "must be a positive multiple")
    cases["batch per actor"] = ("learner.batch_size=20", "must be a multiple of the envs")
    return cases


BAD_VALUES = _bad_values()


def test_the_sweep_covers_every_key_and_every_constraint():
    keys = [key for key, _, _ in _key_fields()]
    assert len(keys) > 60 and all(f"{k}:type" in BAD_VALUES for k in keys)
    with_min = [k for k, _, f in _key_fields() if f.metadata.get("min") is not None]
    with_choices = [k for k, _, f in _key_fields() if f.metadata.get("choices")]
    assert len([c for c in BAD_VALUES if c.endswith(":min")]) == len(with_min) > 40
    assert len([c for c in BAD_VALUES if c.endswith(":choice")]) == len(with_choices) >= 8


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_config_value_is_one_clear_line(case):
    override, expected = BAD_VALUES[case]
    with pytest.raises(ConfigError) as info:
        build_config(None, [override])
    assert expected in one_line(str(info.value))
    key = override.partition("=")[0]
    if case.endswith((":type", ":min", ":nan", ":choice")):
        assert key in str(info.value)


PRESETS = {
    "unknown section": ("envv:\n  id: pong\n", "unknown config key 'envv'"),
    "unknown key": ("env:\n  idd: pong\n", "unknown config key 'env.idd'"),
    "wrong type": ("env:\n  num_envs: many\n", "env.num_envs must be int"),
    "not a mapping": ("- env\n- agent\n", "must be a mapping of sections"),
    "invalid yaml": ("env: [pong\n", "is not valid YAML"),
}


@pytest.mark.parametrize("case", list(PRESETS))
def test_bad_preset_file_is_one_clear_line(tmp_path, case):
    text, expected = PRESETS[case]
    preset = tmp_path / "preset.yaml"
    preset.write_text(text)
    with pytest.raises(ConfigError) as info:
        build_config(preset)
    assert expected in one_line(str(info.value))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["env.id=pongg"], "unknown Atari game 'pongg'; closest valid: pong"),
        (["env.kind=gym", "env.id=Nope-v0"], "unknown gymnasium env id 'Nope-v0'"),
        (["env.kind=gym", "env.id=X-v0", "env.module=nosuchmod"], "cannot import env module"),
    ],
)
def test_unknown_game_is_one_clear_line(overrides, expected):
    with pytest.raises(ConfigError) as info:
        probe_env(build_config(None, overrides))
    assert expected in one_line(str(info.value))


CLI_CASES = {
    "wrong type": (["train.py", "learner.batch_size=abc"], "learner.batch_size must be int"),
    "unknown gym id": (
        ["train.py", "env.kind=gym", "env.id=deltabeast-test/Nope-v0"],
        "unknown gymnasium env id",
    ),
    "bad milestone": (["train.py", "checkpoint.milestones=[-5]"], "integers >= 0"),
    "eval missing": (["evaluate.py", "{tmp}/nope"], "no run folder or checkpoint"),
    "eval not a run": (["evaluate.py", "{tmp}"], "not a run folder"),
    "eval garbage": (["evaluate.py", "{tmp}/garbage.pt"], "not a deltabeast checkpoint"),
}


def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path):
    """A representative subset through the real CLIs (run in parallel: each imports torch);
    tests/test_train.py covers an unknown game, core and --config file the same way."""
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x04not a checkpoint")
    procs = {}
    try:
        for name, (args, _) in CLI_CASES.items():
            argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
            if argv[0] == "train.py":
                argv.append(f"run.dir={tmp_path / name.replace(' ', '_')}")
            procs[name] = subprocess.Popen(
                [sys.executable, *argv],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=90)
            assert proc.returncode == 2, (name, err)
            assert CLI_CASES[name][1] in one_line(err), (name, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["garbage.pt"]
    assert not any(p.is_dir() for p in tmp_path.iterdir())
