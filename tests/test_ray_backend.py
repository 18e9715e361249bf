"""The Ray backend (issue 7): the rollout contract, restarts, train.py, a two-node cluster."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from runners.checkpoint import CheckpointManager
from runners.config import ConfigError
from runners.learner import Learner
from runners.ray_backend import RayBackend, import_ray
from tests.test_runtime import T, build, check_indices, counting_config

try:  # import_ray sets Ray's environment (token auth, no usage stats) before Ray loads
    ray = import_ray()
except ConfigError:  # CI installs the ray extra; this is only a fallback
    pytest.skip("ray is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parent.parent
RAY_DAEMONS = ("raylet", "gcs_server")


def ray_daemons_below(pid: int) -> list[psutil.Process]:
    """Ray's raylet/gcs_server processes among the descendants of `pid`."""
    with_children = psutil.Process(pid).children(recursive=True)
    return [p for p in with_children if p.name() in RAY_DAEMONS]


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as ::ffff:127.0.0.1 (gRPC listens on dual-stack sockets)."""
    address = ipaddress.ip_address(ip)
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_sockets(pid: int) -> list[tuple[str, str, int]]:
    """(process name, address, port) of each TCP socket listening in `pid` or its descendants."""
    found = []
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in p.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((p.name(), conn.laddr.ip, conn.laddr.port))
    return found


def collect(backend, count: int, timeout_s: float = 60.0) -> list:
    batches, deadline = [], time.monotonic() + timeout_s
    while len(batches) < count and time.monotonic() < deadline:
        batch = backend.next_batch(timeout_s=1.0)
        if batch is not None:
            batches.append(batch)
    assert len(batches) == count, f"got {len(batches)} of {count} batches in {timeout_s} s"
    return batches


def until_every_sampler_delivered(backend, timeout_s: float = 60.0) -> None:
    """Samplers start at different speeds; fetch batches until each has sent a rollout."""
    deadline = time.monotonic() + timeout_s
    while None in backend.node_ids() and time.monotonic() < deadline:
        batch = backend.next_batch(timeout_s=1.0)
        if batch is not None:
            check_indices(batch)
    assert None not in backend.node_ids(), "a sampler never delivered"


def test_missing_ray_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # makes `import ray` raise ImportError
    with pytest.raises(ConfigError, match=r"pip install .*ray") as info:
        import_ray()
    assert "\n" not in str(info.value)


@pytest.mark.timeout(90)
def test_batches_follow_the_contract_replay_exactly_and_stale_ones_are_dropped():
    cfg = counting_config("delta", backend="ray", **{"runtime.max_policy_lag": 2})
    info, agent, spec = build(cfg)
    backend = RayBackend(cfg, info, spec, agent)
    daemons = ray_daemons_below(os.getpid())
    assert backend.started_ray and {p.name() for p in daemons} == set(RAY_DAEMONS)
    learner = Learner(agent, cfg.learner, cfg.runtime.total_steps, torch.device("cpu"))
    try:
        resets = 0
        for batch in collect(backend, 4):
            assert batch.obs.shape == (T + 1, 4, 1, 4, 4)
            resets += check_indices(batch)
            with torch.no_grad():
                logits, _, _ = agent(
                    batch.obs, batch.reward, batch.done, batch.action, batch.initial_state
                )
            torch.testing.assert_close(logits[:-1], batch.logits[1:], atol=1e-5, rtol=1e-5)
            stats = learner.update(batch)  # lr 0: the behaviour policy is the target, rho = 1
            assert abs(float(stats["vtrace/mean_rho"]) - 1.0) < 1e-4
            backend.publish(agent.state_dict(), learner.updates)
        assert resets >= 2
        until_every_sampler_delivered(backend)
        assert set(backend.node_ids()) == {ray.get_runtime_context().get_node_id()}
        # jump the policy version: everything queued or in flight is now too old
        backend.publish(agent.state_dict(), 100)
        batch = collect(backend, 1)[0]
        assert backend.dropped_rollouts >= 2
        assert torch.equal(batch.version, torch.full_like(batch.version, 100))
        check_indices(batch)
    finally:
        backend.close()
    assert not ray.is_initialized()
    gone, alive = psutil.wait_procs(daemons, timeout=10)
    assert not alive, alive


@pytest.mark.timeout(90)
def test_a_killed_sampler_is_restarted_fresh_and_batches_keep_coming():
    cfg = counting_config("lstm", backend="ray")
    info, agent, spec = build(cfg)
    backend = RayBackend(cfg, info, spec, agent)
    try:
        until_every_sampler_delivered(backend)
        victim = backend.samplers[0].pid
        assert victim is not None and backend.restarts() == 0
        os.kill(victim, signal.SIGKILL)  # a crash, not a polite stop
        got, deadline = 0, time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = backend.next_batch(timeout_s=1.0)
            if batch is not None:
                check_indices(batch)
                got += 1
            if got >= 4 and backend.samplers[0].pid not in (None, victim):
                break
        assert backend.restarts() == 1 and got >= 4
        assert backend.samplers[0].pid != victim  # it delivered again, from a new process
    finally:
        backend.close()


@pytest.mark.timeout(60)
def test_the_private_ray_instance_listens_on_loopback_only():
    """DESIGN §7. Every Ray 2.60 server can be kept on 127.0.0.1 here: no known exceptions."""
    cfg = counting_config("delta", backend="ray")
    info, agent, spec = build(cfg)
    backend = RayBackend(cfg, info, spec, agent)
    try:
        collect(backend, 1)  # a sampler's worker process is up and serving
        listening = listening_sockets(os.getpid())
    finally:
        backend.close()
    names = {name for name, _, _ in listening}
    assert set(RAY_DAEMONS) <= names and any(n.startswith("ray::Sampler") for n in names), names
    exposed = [s for s in listening if not is_loopback(s[1])]
    assert not exposed, f"reachable from other machines: {exposed}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.timeout(60)
def test_a_gpu_sampler_on_a_node_without_cuda_stops_with_one_line(monkeypatch):
    monkeypatch.setenv("RAY_OVERRIDE_RESOURCES", json.dumps({"GPU": 1}))  # Ray sees one GPU
    cfg = counting_config(
        "delta", backend="ray", **{"runtime.num_actors": 1, "runtime.ray_num_gpus_per_sampler": 1}
    )
    info, agent, spec = build(cfg)
    backend = RayBackend(cfg, info, spec, agent)
    try:
        assert ray.cluster_resources().get("GPU") == 1  # so the sampler was placed, and ran
        with pytest.raises(ConfigError, match="ray_num_gpus_per_sampler=1 but torch") as err:
            collect(backend, 1, timeout_s=30)
    finally:
        backend.close()
    assert str(err.value).startswith("sampler 0: ") and "\n" not in str(err.value)


def train(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", "configs/memory.yaml", *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.timeout(120)
def test_train_py_runs_the_memory_task_through_ray_and_ctrl_c_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    done = train(f"run.dir={run}", "runtime.backend=ray", "runtime.total_steps=2048")
    try:
        stderr = done.communicate(timeout=90)[1]
    finally:
        done.kill()
    assert done.returncode == 0, stderr[-2000:]
    assert CheckpointManager(run / "checkpoints").list()[-1].name.endswith("2048.pt")

    proc = train(f"run.dir={tmp_path / 'sigint'}", "runtime.backend=ray", "logging.every_s=1")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (tmp_path / "sigint" / "tb").exists():
            time.sleep(0.5)
        time.sleep(4)  # samplers up and rollouts flowing
        children = psutil.Process(proc.pid).children(recursive=True)
        assert {p.name() for p in children} >= set(RAY_DAEMONS)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=30)[1]
        assert time.monotonic() - start < 15
        assert proc.returncode == 0, stderr[-2000:]
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, alive
        assert CheckpointManager(tmp_path / "sigint" / "checkpoints").list()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    ray_bin = Path(sys.executable).with_name("ray")
    return subprocess.run(
        [str(ray_bin), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )  # RAY_AUTH_MODE=token comes from the environment (see two_node_cluster)


def cluster_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the cluster whose session lives in `temp_dir`, with their workers."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and any(str(temp_dir) in a for a in p.info["cmdline"] or ()):
            found.append(p)
            found.extend(p.children(recursive=True))
    return found


@pytest.fixture
def two_node_cluster(monkeypatch):
    """A head and a second node on this machine, each offering one CPU and one sampler slot.

    Ray 2.60's head requires token authentication: joining nodes and drivers need
    RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token on this machine). Torn down by
    process id (only this cluster's processes, SIGKILL as `ray stop --force` does), not with
    `ray stop`, which would stop every Ray instance of this user on the machine.
    """
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # for the `ray start` processes
    temp_dir = Path("/tmp") / f"dbray{os.getpid()}"  # short: Ray's socket paths have a limit
    port = free_port()
    common = ["--num-cpus", "1", "--disable-usage-stats"]
    try:
        head = ray_cli(
            "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
            "--include-dashboard", "false", "--temp-dir", str(temp_dir),
            "--resources", json.dumps({"sampler": 1, "node_a": 2}), *common,
        )  # fmt: skip
        assert head.returncode == 0, head.stderr[-2000:]
        address = (temp_dir / "ray_current_cluster").read_text().strip()
        second = ray_cli(
            "start", "--address", address, "--resources", json.dumps({"sampler": 1, "node_b": 2}),
            *common,
        )  # fmt: skip
        assert second.returncode == 0, second.stderr[-2000:]
        yield address
    finally:
        procs = cluster_processes(temp_dir)
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()  # gcs_server ignores SIGTERM while its raylets live
        psutil.wait_procs(procs, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not [p for p in procs if p.is_running() and p.status() != "zombie"]


@pytest.mark.timeout(120)
def test_samplers_spread_over_a_two_node_cluster(two_node_cluster):
    cfg = counting_config(
        "delta",
        backend="ray",
        **{"runtime.ray_address": two_node_cluster, "runtime.ray_resources": "{sampler: 1}"},
    )
    info, agent, spec = build(cfg)
    backend = RayBackend(cfg, info, spec, agent)
    try:
        assert not backend.started_ray
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
        until_every_sampler_delivered(backend)
        used = backend.node_ids()
        assert len(set(used)) == 2, used
        assert {name for node in used for name in nodes[node] if name.startswith("node_")} == {
            "node_a",
            "node_b",
        }
    finally:
        backend.close()
    assert not ray.is_initialized()
