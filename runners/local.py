"""Rollout backends on one machine: `local` (actor processes) and `sync` (one process).

Both hand the trainer whole learner batches and take the learner's weights back, so the
trainer does not care where acting happens.

Local backend protocol: every actor owns a fixed set of rollout slots and talks to the
learner through its own pipe (slot numbers in, `(slot, timings)` out). A pipe per actor means a
crashed or killed actor can break nothing but its own channel; the supervisor then restarts it
with a fresh seed and hands its unfinished slots to the new process.

With `runtime.inference=central` one more supervised child, the inference server
(runners/inference_server.py), acts for every actor; each actor incarnation gets a fresh pipe
to it, whose server end the learner passes on over the server's control pipe. The server is
not restarted: the core states of every env live only there, so its death stops the run.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import logging
import math
import signal
import time
import traceback
from multiprocessing.connection import wait
from multiprocessing.reduction import send_handle

import torch
import torch.multiprocessing as mp

from runners.actor import RolloutWorker, SharedWeights
from runners.config import Config, from_dict, to_dict
from runners.factory import EnvInfo, make_agent, make_env
from runners.inference_server import (
    CentralRolloutWorker,
    InferenceChannels,
    InferenceClient,
    InferenceServer,
)
from runners.rollout import Batch, RolloutBuffers, RolloutSpec

log = logging.getLogger(__name__)

SEED_STRIDE = 10_007  # actors' env seeds must not overlap
MAX_FAILURES_IN_A_ROW = 3  # an actor failing this often without delivering stops the run
STARTUP_TIMEOUT_S = 180.0  # a new actor imports torch and builds its env and agent first
RESTART_WINDOW_S = 600.0  # more than MAX_RESTARTS_IN_WINDOW restarts of one actor in this
MAX_RESTARTS_IN_WINDOW = 5  # window stop the run: a fault that recurs after every restart


class BackendError(RuntimeError):
    """A component of the runtime failed; the message carries its traceback."""


def slots_per_actor(cfg: Config, spec: RolloutSpec) -> int:
    """Rollout slots each actor fills in turn.

    By default enough that actors keep acting while the learner holds one batch (at least two
    each). `runtime.num_buffers` sets the total instead, shared evenly and rounded up: with one
    slot per actor, an actor waits for the learner to take its rollout, and the rollouts the
    learner gets are fewer updates old (less policy lag).
    """
    actors = cfg.runtime.num_actors
    if cfg.runtime.num_buffers:
        return math.ceil(cfg.runtime.num_buffers / actors)
    per_batch = cfg.learner.batch_size // spec.num_envs
    return max(2, math.ceil((2 * per_batch + actors) / actors))


def _die_with_parent() -> None:
    """Linux: deliver SIGTERM to this process when its parent dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _send(conn, message) -> None:
    """Send on a pipe whose other end may be gone (the supervisor deals with dead actors)."""
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.send(message)


def _stop_child(process, conn, grace_s: float) -> None:
    """Ask a child to stop (None on its pipe), then terminate and kill it if it lingers."""
    _send(conn, None)
    if process is not None:
        process.join(grace_s)
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    if conn is not None:
        conn.close()


def actor_main(
    actor_id: int,
    cfg_dict: dict,
    info: EnvInfo,
    buffers: RolloutBuffers,
    weights: SharedWeights,
    conn,
    seed: int,
    client: InferenceClient | None = None,
) -> None:
    """Entry point of an actor process: fill the slots the learner sends until told to stop.

    With a `client`, the inference server acts and the actor only steps its envs.
    """
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the learner coordinates shutdown
    try:
        cfg = from_dict(cfg_dict)
        torch.set_num_threads(cfg.runtime.actor_threads)
        torch.manual_seed(seed)
        env = make_env(cfg, buffers.spec.num_envs, seed)
        agent, version = None, 0
        if client is None:
            agent = make_agent(cfg, info)
            agent.eval()
            version = weights.load_into(agent) or 0
            worker = RolloutWorker(env, agent, buffers, seed)
        else:
            worker = CentralRolloutWorker(env, client, buffers, seed)
        conn.send(("ready",))
        while True:
            slot = conn.recv()
            if slot is None:
                break
            if agent is not None and weights.latest_version() > version:
                version = weights.load_into(agent) or version
            start = time.perf_counter()
            worker.fill(slot, version)
            elapsed = time.perf_counter() - start
            conn.send(("rollout", slot, elapsed, worker.env_seconds, worker.inference_seconds))
            worker.env_seconds = worker.inference_seconds = 0.0
        env.close()
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass  # the learner is gone or stopping
    except BaseException:
        _send(conn, ("error", traceback.format_exc()))
        raise SystemExit(1) from None


def server_main(
    cfg_dict: dict,
    info: EnvInfo,
    channels: InferenceChannels,
    buffers: RolloutBuffers,
    weights: SharedWeights,
    control,
) -> None:
    """Entry point of the inference server process (runtime.inference=central)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        cfg = from_dict(cfg_dict)
        torch.set_num_threads(cfg.runtime.actor_threads)
        server = InferenceServer(cfg, info, channels, buffers, weights)
        control.send(("ready", str(server.device)))
        server.run(control)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        pass
    except BaseException:
        _send(control, ("error", traceback.format_exc()))
        raise SystemExit(1) from None


class _Actor:
    """The learner's view of one actor process."""

    def __init__(self, actor_id: int, slots: list[int]) -> None:
        self.actor_id = actor_id
        self.slots = slots
        self.outstanding: set[int] = set()
        self.process = None
        self.conn = None
        self.last_seen = time.monotonic()
        self.ready = False
        self.restarts = 0
        self.restart_times: collections.deque[float] = collections.deque()
        self.failures_in_a_row = 0
        self.last_error = ""


class LocalBackend:
    """Actor processes writing shared-memory slots; the learner stacks them into batches."""

    def __init__(self, cfg: Config, info: EnvInfo, spec: RolloutSpec, agent: torch.nn.Module):
        self.cfg = cfg
        self.info = info
        self.spec = spec
        self.ctx = mp.get_context("spawn")
        per_actor = slots_per_actor(cfg, spec)
        self.buffers = RolloutBuffers(spec, per_actor * cfg.runtime.num_actors)
        self.weights = SharedWeights(agent.state_dict())
        self.slots_per_batch = cfg.learner.batch_size // spec.num_envs
        self.ready: collections.deque[tuple[int, int]] = collections.deque()
        self.actors = [
            _Actor(i, list(range(i * per_actor, (i + 1) * per_actor)))
            for i in range(cfg.runtime.num_actors)
        ]
        self.dropped_rollouts = 0
        self.timings = collections.Counter()
        self._seed_counter = 0
        self.channels: InferenceChannels | None = None
        self.server = self.server_conn = None
        self.server_ready, self.server_started = False, 0.0
        if cfg.runtime.inference == "central":
            self.channels = InferenceChannels(spec, cfg.runtime.num_actors)
            self._start_server()
        for actor in self.actors:
            self._start(actor)

    def _start_server(self) -> None:
        parent_conn, child_conn = self.ctx.Pipe()
        self.server = self.ctx.Process(
            target=server_main,
            args=(
                to_dict(self.cfg),
                self.info,
                self.channels,
                self.buffers,
                self.weights,
                child_conn,
            ),
            name="deltabeast-inference",
            daemon=True,
        )
        self.server.start()
        child_conn.close()
        self.server_conn = parent_conn
        self.server_started = time.monotonic()

    def _check_server(self) -> None:
        """Stop the run if the inference server raised, died or did not come up in time."""
        if self.server is None:
            return
        error, closed = "", False
        try:
            while not error and self.server_conn.poll():
                message = self.server_conn.recv()
                if message[0] == "error":
                    error = message[1]
                else:
                    self.server_ready = True
                    log.info("inference server ready on %s", message[1])
        except (EOFError, OSError):
            closed = True
        if error or closed or not self.server.is_alive():
            self.server.join(2.0)
            what = "raised" if error else f"died (exit code {self.server.exitcode})"
            raise BackendError(
                f"the inference server {what}; stopping, since a restarted server would have "
                f"lost every env's core state" + (f":\n{error}" if error else "")
            )
        waited = time.monotonic() - self.server_started
        if not self.server_ready and waited > STARTUP_TIMEOUT_S:
            raise BackendError(f"the inference server did not start within {waited:.0f} s")

    def _connect_to_server(self, actor_id: int) -> InferenceClient:
        """A fresh pipe for a new actor process: its server end goes to the server."""
        server_end, actor_end = self.ctx.Pipe()
        _send(self.server_conn, ("attach", actor_id))
        with contextlib.suppress(OSError):  # a dead server is reported by _check_server
            send_handle(self.server_conn, server_end.fileno(), self.server.pid)
        server_end.close()
        timeout_s = self.cfg.runtime.actor_timeout_s / 2  # fails before the learner's timeout
        return InferenceClient(self.channels, actor_id, actor_end, timeout_s, STARTUP_TIMEOUT_S)

    def _next_seed(self, actor_id: int) -> int:
        self._seed_counter += 1
        return self.cfg.seed + SEED_STRIDE * (actor_id + 1) + 7919 * self._seed_counter

    def _start(self, actor: _Actor) -> None:
        parent_conn, child_conn = self.ctx.Pipe()
        client = None if self.server is None else self._connect_to_server(actor.actor_id)
        actor.process = self.ctx.Process(
            target=actor_main,
            args=(
                actor.actor_id,
                to_dict(self.cfg),
                self.info,
                self.buffers,
                self.weights,
                child_conn,
                self._next_seed(actor.actor_id),
                client,
            ),
            name=f"deltabeast-actor-{actor.actor_id}",
            daemon=True,
        )
        actor.process.start()
        child_conn.close()
        if client is not None:
            client.conn.close()  # the actor holds its own copy now
        actor.conn = parent_conn
        actor.ready = False
        actor.last_seen = time.monotonic()
        actor.outstanding = set(actor.slots) - {slot for _, slot in self.ready}
        for slot in sorted(actor.outstanding):
            parent_conn.send(slot)

    def _restart(self, actor: _Actor, reason: str) -> None:
        self._check_server()  # an actor that lost the server is no reason to restart it
        now = time.monotonic()
        actor.failures_in_a_row += 1
        actor.restart_times.append(now)
        while actor.restart_times[0] < now - RESTART_WINDOW_S:
            actor.restart_times.popleft()
        detail = f":\n{actor.last_error}" if actor.last_error else ""
        if actor.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            raise BackendError(
                f"actor {actor.actor_id} {reason}, {actor.failures_in_a_row} times in a row "
                f"without delivering a rollout; stopping{detail}"
            )
        if len(actor.restart_times) > MAX_RESTARTS_IN_WINDOW:
            raise BackendError(
                f"actor {actor.actor_id} {reason}: {len(actor.restart_times)} restarts within "
                f"{RESTART_WINDOW_S:.0f} s; stopping{detail}"
            )
        log.warning("actor %d %s; restarting it with a fresh seed", actor.actor_id, reason)
        self._stop_process(actor, grace_s=1.0)
        actor.restarts += 1
        self._start(actor)

    def _stop_process(self, actor: _Actor, grace_s: float) -> None:
        _stop_child(actor.process, actor.conn, grace_s)
        actor.conn = None

    def _receive(self, actor: _Actor) -> None:
        try:
            message = actor.conn.recv()
        except (EOFError, OSError):
            code = actor.process.exitcode if actor.process else None
            self._restart(actor, f"exited (exit code {code})")
            return
        actor.last_seen = time.monotonic()
        if message[0] == "error":
            actor.last_error = message[1]
            log.error("actor %d raised:\n%s", actor.actor_id, message[1].rstrip())
            self._restart(actor, "raised an exception")
            return
        if message[0] == "ready":
            actor.ready = True
            return
        _, slot, total_s, env_s, inference_s = message
        actor.failures_in_a_row = 0
        actor.last_error = ""
        actor.outstanding.discard(slot)
        self.timings["actor_rollout_s"] += total_s
        self.timings["actor_env_s"] += env_s
        self.timings["actor_inference_s"] += inference_s
        self.ready.append((actor.actor_id, slot))

    def _supervise(self) -> None:
        """Restart actors that died, or that hold slots but have been silent for too long."""
        self._check_server()
        now = time.monotonic()
        for actor in self.actors:
            timeout = self.cfg.runtime.actor_timeout_s
            if not actor.ready:
                timeout = max(timeout, STARTUP_TIMEOUT_S)
            silent = now - actor.last_seen
            if not actor.process.is_alive() and not actor.conn.poll():
                self._restart(actor, f"died (exit code {actor.process.exitcode})")
            elif actor.outstanding and silent > timeout:
                self._restart(actor, f"sent nothing for {silent:.0f} s (hung)")

    def _give_back(self, actor_id: int, slot: int) -> None:
        actor = self.actors[actor_id]
        if not actor.outstanding:  # it was idle, waiting for a slot: its silence starts now
            actor.last_seen = time.monotonic()
        actor.outstanding.add(slot)
        _send(actor.conn, slot)  # if the actor is gone, its restart re-sends the slot

    def next_batch(self, timeout_s: float = 1.0) -> Batch | None:
        """The next learner batch, or None if none was ready within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while len(self.ready) < self.slots_per_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._supervise()
                return None
            conns = {a.conn: a for a in self.actors}
            server = [] if self.server_conn is None else [self.server_conn]
            for conn in wait([*conns, *server], timeout=min(remaining, 0.5)):
                if conn is self.server_conn:
                    self._check_server()
                else:
                    self._receive(conns[conn])
            self._supervise()
        taken = [self.ready.popleft() for _ in range(self.slots_per_batch)]
        max_lag = self.cfg.runtime.max_policy_lag
        if max_lag:
            newest = self.weights.latest_version()
            stale = [t for t in taken if newest - int(self.buffers.version[t[1]]) > max_lag]
            if stale:
                self.dropped_rollouts += len(stale)
                for actor_id, slot in stale:
                    self._give_back(actor_id, slot)
                self.ready.extendleft(reversed([t for t in taken if t not in stale]))
                return None
        batch = self.buffers.batch([slot for _, slot in taken])
        for actor_id, slot in taken:
            self._give_back(actor_id, slot)
        return batch

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.weights.publish(state_dict, version)

    def restarts(self) -> int:
        return sum(a.restarts for a in self.actors)

    def pids(self) -> list[int]:
        children = [a.process for a in self.actors] + [self.server]
        return [p.pid for p in children if p is not None]

    def close(self) -> None:
        """Actors first (they finish a rollout through the server), then the server."""
        for actor in self.actors:
            _send(actor.conn, None)
        deadline = time.monotonic() + 5.0
        for actor in self.actors:
            if actor.process is not None:
                actor.process.join(max(0.0, deadline - time.monotonic()))
            self._stop_process(actor, grace_s=0.0)
        if self.server is not None:
            _stop_child(self.server, self.server_conn, grace_s=5.0)
            self.server_conn = None


class SyncBackend:
    """The same workers in the learner's process, acting and learning in turn (debugging, tests)."""

    def __init__(self, cfg: Config, info: EnvInfo, spec: RolloutSpec, agent: torch.nn.Module):
        self.slots_per_batch = cfg.learner.batch_size // spec.num_envs
        self.buffers = RolloutBuffers(spec, self.slots_per_batch, shared=False)
        self.actor_agent = make_agent(cfg, info)
        self.actor_agent.load_state_dict(agent.state_dict())
        self.actor_agent.eval()
        self.version = 0
        self.workers = [
            RolloutWorker(
                make_env(cfg, spec.num_envs, cfg.seed + SEED_STRIDE * (i + 1)),
                self.actor_agent,
                self.buffers,
                cfg.seed + SEED_STRIDE * (i + 1),
            )
            for i in range(cfg.runtime.num_actors)
        ]
        self.next_worker = 0
        self.dropped_rollouts = 0
        self.timings = collections.Counter()

    def next_batch(self, timeout_s: float = 1.0) -> Batch:
        for slot in range(self.slots_per_batch):
            worker = self.workers[self.next_worker]
            self.next_worker = (self.next_worker + 1) % len(self.workers)
            start = time.perf_counter()
            worker.fill(slot, self.version)
            self.timings["actor_rollout_s"] += time.perf_counter() - start
            self.timings["actor_env_s"] += worker.env_seconds
            self.timings["actor_inference_s"] += worker.inference_seconds
            worker.env_seconds = worker.inference_seconds = 0.0
        return self.buffers.batch(list(range(self.slots_per_batch)))

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        self.actor_agent.load_state_dict(state_dict)
        self.version = version

    def restarts(self) -> int:
        return 0

    def pids(self) -> list[int]:
        return []

    def close(self) -> None:
        for worker in self.workers:
            worker.env.close()
