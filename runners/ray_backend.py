"""The Ray backend: samplers are Ray actors on any node of a cluster; the learner stays here.

Each sampler owns a vector env, a copy of the agent and its envs' core state (a
`RolloutWorker` writing a private 1-slot `RolloutBuffers`) and returns one whole `[T+1, E]`
rollout per `sample()` call. The learner keeps a fixed number of calls per sampler in flight
or waiting in its queue (like the local backend's slots), takes whichever rollouts are ready
(`ray.wait`), and copies them into a local `RolloutBuffers` to stack a batch. Weights go out
once per update through the object store: one `ray.put`, whose reference every later call
carries (Ray resolves it in the sampler). There are no per-step remote calls.

Fault tolerance: samplers restart on crash (`max_restarts=-1`; Ray brings them back on a live
node), a restarted sampler starts fresh (new env, new core state, fresh seed: every call carries
a seed that is only used when the sampler has to build its env), and the learner resubmits the
calls the crash lost, backing off while the actor restarts. A sampler whose calls keep failing
for minutes without one rollout stops the run with a clear message.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from runners.actor import RolloutWorker
from runners.config import Config, ConfigError, from_dict, to_dict
from runners.factory import EnvInfo, make_agent, make_env
from runners.local import SEED_STRIDE, BackendError, slots_per_actor
from runners.rollout import Batch, RolloutBuffers, RolloutSpec

log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[ray]"  (or: pip install ray==2.60.0)'
FIELDS = (
    "obs",
    "reward",
    "done",
    "action",
    "logits",
    "episode_end",
    "episode_return",
    "episode_length",
)
MAX_FAILED_CALLS = 60  # failed calls without a rollout in between (~4 min of back-off): give up


def import_ray():
    """The `ray` module, or a one-line ConfigError saying how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # `ray start --head` (2.60) requires token auth; a token client also joins clusters without
    # it. Ray reads this when it is imported.
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError:
        raise ConfigError(
            f"runtime.backend=ray needs Ray, which is not installed: {INSTALL_HINT}"
        ) from None
    return ray


class DeviceAgent:
    """Runs an agent on a GPU for a `RolloutWorker`, which keeps its env tensors on the CPU."""

    def __init__(self, agent: torch.nn.Module, device: torch.device) -> None:
        self.agent = agent.to(device)
        self.device = device

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return self.agent.initial_state(batch_size, self.device)

    def act(self, obs, reward, done, action, state):
        d = self.device
        action, logits, value, state = self.agent.act(
            obs.to(d), reward.to(d), done.to(d), action.to(d), state
        )
        return action.cpu(), logits.cpu(), value.cpu(), state


def sampler_device(num_gpus: float) -> torch.device:
    """Where a sampler acts: on its node's GPU if it reserved one, else on the CPU.

    A GPU reservation on a node whose torch cannot use CUDA is a broken setup, not something to
    paper over: acting on the CPU would leave the reserved GPU idle and the run far slower than
    sized, so it stops with one line (as `runtime.device=cuda` does without CUDA). Checked on the
    first call, so the error comes back as that call's result rather than as a crash to restart.
    """
    if num_gpus <= 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        import ray

        raise ConfigError(
            f"runtime.ray_num_gpus_per_sampler={num_gpus:g} but torch {torch.__version__} on "
            f"node {ray.util.get_node_ip_address()} sees no CUDA device "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); install "
            "a CUDA build of torch on the GPU nodes, or set runtime.ray_num_gpus_per_sampler=0"
        )
    return torch.device("cuda")


class Sampler:
    """A Ray actor's body: one vector env and an agent copy, one rollout per `sample()` call.

    The env is built on the first call (with that call's seed), so a sampler that Ray restarts
    starts fresh with the seed of the call that finds it empty.
    """

    def __init__(self, cfg_dict: dict, info: EnvInfo, spec: RolloutSpec) -> None:
        import ray

        self.cfg = from_dict(cfg_dict)
        self.info = info
        self.spec = spec
        torch.set_num_threads(self.cfg.runtime.actor_threads)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.worker: RolloutWorker | None = None
        self.agent: torch.nn.Module | None = None
        self.version: int | None = None

    def _build(self, seed: int) -> None:
        device = sampler_device(self.cfg.runtime.ray_num_gpus_per_sampler)
        torch.manual_seed(seed)
        env = make_env(self.cfg, self.spec.num_envs, seed)
        self.agent = make_agent(self.cfg, self.info).eval()
        actor = self.agent if device.type == "cpu" else DeviceAgent(self.agent, device)
        buffers = RolloutBuffers(self.spec, 1, shared=False)
        self.worker = RolloutWorker(env, actor, buffers, seed)

    def sample(self, weights: dict[str, torch.Tensor], version: int, seed: int) -> dict:
        """One rollout (slot 0 of the private buffers) as numpy arrays, with its metadata."""
        built = self.worker is None
        if built:
            self._build(seed)
        if version != self.version:
            self.agent.load_state_dict(weights)
            self.version = version
        worker = self.worker
        start = time.perf_counter()
        worker.fill(0, version)
        rollout_s = time.perf_counter() - start
        b = worker.buffers
        out = {name: getattr(b, name)[0].numpy() for name in FIELDS}
        out["initial_state"] = [s[0].numpy() for s in b.initial_state]
        out.update(
            version=int(b.version[0]),
            built=built,
            node_id=self.node_id,
            pid=os.getpid(),
            rollout_s=rollout_s,
            env_s=worker.env_seconds,
            inference_s=worker.inference_seconds,
        )
        worker.env_seconds = worker.inference_seconds = 0.0
        return out


@dataclass
class _SamplerState:
    """The learner's view of one sampler actor."""

    sampler_id: int
    handle: object
    free: int  # calls it may be sent now (its budget minus calls in flight and rollouts queued)
    calls: int = 0
    has_worker: bool = False  # it delivered since it was (re)started
    restarts: int = 0
    failed_calls: int = 0  # since its last rollout
    retry_at: float = 0.0  # back-off while Ray restarts it
    last_seen: float = field(default_factory=time.monotonic)
    node_id: str | None = None
    pid: int | None = None


@contextlib.contextmanager
def _loopback_node():
    """While inside, a Ray instance started here is a node at 127.0.0.1 serving on loopback only.

    Ray 2.60 turns a node address of 127.0.0.1 into the machine's outside address unless
    `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is off, which Ray reads once, when imported, into
    `ray_constants.ENABLE_RAY_CLUSTER`. On a node whose address is 127.0.0.1, the GCS, raylet,
    worker and agent servers listen on 127.0.0.1; on any other address, on all interfaces.
    The switch is off only while the private instance starts: joining a cluster needs it on.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _connect(ray, cfg: Config) -> bool:
    """Join the configured cluster, or start a private one; True if this started Ray."""
    address = cfg.runtime.ray_address
    sigterm = signal.getsignal(signal.SIGTERM)  # ray.init installs its own; the trainer's wins
    try:
        if address == "local":
            needed = cfg.runtime.num_actors * cfg.runtime.ray_num_cpus_per_sampler
            with _loopback_node():  # DESIGN §7: services bind to 127.0.0.1
                ray.init(
                    num_cpus=max(os.cpu_count() or 1, math.ceil(needed)),
                    include_dashboard=False,
                    logging_level=logging.WARNING,
                )
        else:
            ray.init(address=address, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"runtime.ray_address={address}: cannot connect to Ray: {first}"
        ) from None
    finally:
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(signal.SIGTERM, sigterm)
    return address == "local"


def _check_resources(ray, need: dict[str, float], num_samplers: int) -> None:
    """Refuse resources no node offers; warn when not every sampler fits at once."""
    have = ray.cluster_resources()
    for name, amount in need.items():
        if amount > 0 and have.get(name, 0.0) < amount:
            offered = ", ".join(f"{k}={v:g}" for k, v in sorted(have.items()) if "node:" not in k)
            raise ConfigError(
                f"each Ray sampler needs {name}={amount:g} but the cluster has "
                f"{have.get(name, 0.0):g}; it offers: {offered}"
            )
    fits = min(
        (int(have.get(name, 0.0) // amount) for name, amount in need.items() if amount > 0),
        default=num_samplers,
    )
    if fits < num_samplers:
        log.warning(
            "the Ray cluster has room for %d of %d samplers now; the rest wait for nodes",
            fits,
            num_samplers,
        )


class RayBackend:
    """Sampler actors on a Ray cluster feeding the learner in this process."""

    def __init__(self, cfg: Config, info: EnvInfo, spec: RolloutSpec, agent: torch.nn.Module):
        ray = import_ray()
        self.ray = ray
        self.cfg = cfg
        self.connected = False
        self.started_ray = False
        if not ray.is_initialized():
            self.started_ray = _connect(ray, cfg)
            self.connected = True
        rt = cfg.runtime
        need = {"CPU": rt.ray_num_cpus_per_sampler, "GPU": rt.ray_num_gpus_per_sampler}
        need.update({k: float(v) for k, v in rt.ray_resources.items()})
        try:
            _check_resources(ray, need, rt.num_actors)
        except ConfigError:
            self.close()
            raise
        self.slots_per_batch = cfg.learner.batch_size // spec.num_envs
        self.buffers = RolloutBuffers(spec, self.slots_per_batch, shared=False)
        self.actor_class = ray.remote(Sampler).options(
            num_cpus=rt.ray_num_cpus_per_sampler,
            num_gpus=rt.ray_num_gpus_per_sampler,
            resources=dict(rt.ray_resources) or None,
            max_restarts=-1,
            max_task_retries=0,
        )
        self.actor_args = (to_dict(cfg), info, spec)
        self.weights_ref = None
        self.version = 0
        self.pending: dict = {}  # ObjectRef -> sampler
        self.ready: collections.deque[tuple[_SamplerState, dict]] = collections.deque()
        self.dropped_rollouts = 0
        self.timings = collections.Counter()
        budget = slots_per_actor(cfg, spec)
        self.samplers = [
            _SamplerState(i, self.actor_class.remote(*self.actor_args), free=budget)
            for i in range(rt.num_actors)
        ]
        self.publish(agent.state_dict(), 0)

    # -- calls ------------------------------------------------------------------------------

    def _seed(self, sampler: _SamplerState) -> int:
        sampler.calls += 1
        return self.cfg.seed + SEED_STRIDE * (sampler.sampler_id + 1) + 7919 * sampler.calls

    def _submit(self) -> None:
        """Send every sampler as many calls as its budget allows, with the latest weights."""
        now = time.monotonic()
        for s in self.samplers:
            while s.free > 0 and s.retry_at <= now:
                ref = s.handle.sample.remote(self.weights_ref, self.version, self._seed(s))
                self.pending[ref] = s
                s.free -= 1

    def _lost(self, sampler: _SamplerState, exc: Exception) -> None:
        """A call died with its actor (or reached it while Ray restarts it): retry it later.

        The first failure after the sampler delivered counts one restart; the failures of its
        other queued calls, and of calls sent while it restarts, are the same loss.
        """
        sampler.free += 1
        sampler.failed_calls += 1
        sampler.retry_at = time.monotonic() + min(0.5 * sampler.failed_calls, 5.0)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if sampler.failed_calls >= MAX_FAILED_CALLS:
            raise BackendError(
                f"sampler {sampler.sampler_id} failed {sampler.failed_calls} calls in a row "
                f"without producing a rollout; last: {reason}"
            )
        if sampler.has_worker:
            sampler.has_worker = False
            sampler.restarts += 1
            log.warning("sampler %d lost (%s); Ray restarts it fresh", sampler.sampler_id, reason)

    def _receive(self, ref) -> None:
        sampler = self.pending.pop(ref)
        try:
            out = self.ray.get(ref)
        except self.ray.exceptions.RayActorError as exc:
            self._lost(sampler, exc)
            return
        except self.ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ConfigError):  # a setup problem on its node: one line
                raise ConfigError(f"sampler {sampler.sampler_id}: {exc.cause}") from None
            raise BackendError(f"sampler {sampler.sampler_id} failed:\n{exc}") from None
        sampler.last_seen = time.monotonic()
        sampler.failed_calls = 0
        if out["built"] and sampler.has_worker:  # restarted between two calls: nothing failed
            sampler.restarts += 1
            log.warning("sampler %d was restarted", sampler.sampler_id)
        sampler.has_worker = True
        sampler.node_id, sampler.pid = out["node_id"], out["pid"]
        self.timings["actor_rollout_s"] += out["rollout_s"]
        self.timings["actor_env_s"] += out["env_s"]
        self.timings["actor_inference_s"] += out["inference_s"]
        self.ready.append((sampler, out))

    def _drop_stale(self) -> None:
        max_lag = self.cfg.runtime.max_policy_lag
        if not max_lag:
            return
        fresh = collections.deque()
        for sampler, out in self.ready:
            if self.version - out["version"] > max_lag:
                self.dropped_rollouts += 1
                sampler.free += 1
            else:
                fresh.append((sampler, out))
        self.ready = fresh

    def _supervise(self) -> None:
        """Restart samplers that produced nothing for `runtime.actor_timeout_s` (hung)."""
        now = time.monotonic()
        busy = {s.sampler_id for s in self.pending.values()}
        for s in self.samplers:
            silent = now - s.last_seen
            if s.sampler_id in busy and silent > self.cfg.runtime.actor_timeout_s:
                log.warning(
                    "sampler %d sent nothing for %.0f s; restarting it", s.sampler_id, silent
                )
                self.ray.kill(s.handle, no_restart=False)
                s.last_seen = now

    # -- backend interface ------------------------------------------------------------------

    def next_batch(self, timeout_s: float = 1.0) -> Batch | None:
        """The next learner batch, or None if none was ready within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        self._drop_stale()
        self._submit()
        while len(self.ready) < self.slots_per_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._supervise()
                return None
            refs = list(self.pending)
            if refs:
                self.ray.wait(refs, num_returns=1, timeout=min(remaining, 1.0))
                done, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in done:
                    self._receive(ref)
            else:  # every sampler is backing off
                time.sleep(min(remaining, 0.1))
            self._drop_stale()
            self._submit()
            self._supervise()
        b = self.buffers
        for slot in range(self.slots_per_batch):
            sampler, out = self.ready.popleft()
            for name in FIELDS:
                np.copyto(getattr(b, name)[slot].numpy(), out[name])
            for saved, state in zip(b.initial_state, out["initial_state"], strict=True):
                np.copyto(saved[slot].numpy(), state)
            b.version[slot] = out["version"]
            sampler.free += 1  # sent again at the next publish, with the new weights
        return b.batch(list(range(self.slots_per_batch)))

    def publish(self, state_dict: dict[str, torch.Tensor], version: int) -> None:
        """One object-store copy of the weights for all samplers; refill their queues."""
        self.weights_ref = self.ray.put({k: v.detach().cpu() for k, v in state_dict.items()})
        self.version = version
        self._submit()

    def restarts(self) -> int:
        return sum(s.restarts for s in self.samplers)

    def pids(self) -> list[int]:
        """Worker pids of the samplers on this machine (as last reported)."""
        return [s.pid for s in self.samplers if s.pid is not None]

    def node_ids(self) -> list[str | None]:
        """The Ray node each sampler last reported from."""
        return [s.node_id for s in self.samplers]

    def close(self) -> None:
        """Kill the samplers; shut Ray down if this backend started it, else disconnect."""
        for s in getattr(self, "samplers", []):
            with contextlib.suppress(Exception):
                self.ray.kill(s.handle, no_restart=True)
        self.pending = {}
        self.ready = collections.deque()
        if self.connected:
            self.ray.shutdown()
            self.connected = False
