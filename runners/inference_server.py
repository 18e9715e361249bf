"""Central batched inference for the local backend (`runtime.inference=central`).

One server process owns the agent and the core state of every env of every actor, on
`runtime.device`'s device when that is an available GPU. Actors only step their envs: per
step, an actor writes its envs' last outputs into its request slot in shared memory and sends
one small message on its own pipe; the server answers with actions and logits in the actor's
response slot. The server batches whatever requests are waiting: it serves as soon as every
connected actor asked, or `runtime.inference_timeout_ms` after the first waiting request.

Rollout slots keep DESIGN §2 exactly: the actor writes env outputs, actions and logits as the
per-actor path does, and the server, which holds the core states, writes each slot's initial
state and policy version when the actor tells it (with its request) which slot it begins.
"""

from __future__ import annotations

import struct
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.reduction import recv_handle

import torch

from runners.actor import RolloutWorker, SharedWeights
from runners.config import Config
from runners.factory import EnvInfo, make_agent
from runners.rollout import RolloutBuffers, RolloutSpec

REQUEST = struct.Struct("<q")  # the rollout slot an actor begins with this step, or NO_SLOT
NO_SLOT = -1
IDLE_WAIT_S = 1.0  # the longest the server sleeps without a request (control messages wake it)


def inference_device(cfg: Config) -> torch.device:
    """The learner's device choice when it is an available GPU, else the CPU."""
    wants_gpu = cfg.runtime.device in ("auto", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


class InferenceChannels:
    """Per-actor request and response slots in shared memory, `[num_actors, E, ...]`."""

    def __init__(self, spec: RolloutSpec, num_actors: int) -> None:
        a, e = num_actors, spec.num_envs

        def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype).share_memory_()

        self.num_envs = e
        self.obs = alloc((a, e, *spec.obs_shape), spec.obs_dtype)
        self.reward = alloc((a, e), torch.float32)
        self.done = alloc((a, e), torch.bool)
        self.prev_action = alloc((a, e), torch.int64)
        self.action = alloc((a, e), torch.int64)
        self.logits = alloc((a, e, spec.num_actions), torch.float32)


class InferenceClient:
    """An actor's end of the server: one request and one answer per env step.

    Stands in for the agent of a `RolloutWorker` (see `CentralRolloutWorker`). The first
    answer may wait for the server to start; later ones time out after `timeout_s`.
    """

    def __init__(
        self,
        channels: InferenceChannels,
        actor_id: int,
        conn: Connection,
        timeout_s: float,
        startup_timeout_s: float,
    ) -> None:
        self.channels = channels
        self.actor_id = actor_id
        self.conn = conn
        self.timeout_s = timeout_s
        self.next_timeout_s = startup_timeout_s
        self.slot = NO_SLOT

    def initial_state(self, batch_size: int) -> tuple[torch.Tensor, ...]:
        return ()  # the server keeps the core states

    def begin(self, slot: int) -> None:
        """The next request starts `slot`: the server writes its initial state and version."""
        self.slot = slot

    def act(
        self,
        obs: torch.Tensor,
        reward: torch.Tensor,
        done: torch.Tensor,
        prev_action: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Action `[E]` and behaviour logits `[E, A]` from the server."""
        ch, i = self.channels, self.actor_id
        ch.obs[i].copy_(obs)
        ch.reward[i].copy_(reward)
        ch.done[i].copy_(done)
        ch.prev_action[i].copy_(prev_action)
        self.conn.send_bytes(REQUEST.pack(self.slot))
        self.slot = NO_SLOT
        if not self.conn.poll(self.next_timeout_s):
            raise RuntimeError(
                f"no answer from the inference server within {self.next_timeout_s:.0f} s"
            )
        self.conn.recv_bytes()
        self.next_timeout_s = self.timeout_s
        return ch.action[i].clone(), ch.logits[i].clone()


class CentralRolloutWorker(RolloutWorker):
    """A `RolloutWorker` whose policy steps happen in the server (`agent` is a client)."""

    agent: InferenceClient

    def start_rollout(self, slot: int, version: int) -> None:
        self.agent.begin(slot)  # the server holds the state and knows the version it uses

    def policy_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.agent.act(self.obs, self.reward, self.done, self.action)


class InferenceServer:
    """The agent and every env's core state; serves batches of actor requests."""

    def __init__(
        self,
        cfg: Config,
        info: EnvInfo,
        channels: InferenceChannels,
        buffers: RolloutBuffers,
        weights: SharedWeights,
    ) -> None:
        self.device = inference_device(cfg)
        self.agent = make_agent(cfg, info).to(self.device).eval()
        self.weights = weights
        self.version = weights.load_into(self.agent) or 0
        self.channels = channels
        self.buffers = buffers
        self.timeout_s = cfg.runtime.inference_timeout_ms / 1000.0
        self.num_actors = cfg.runtime.num_actors
        e = channels.num_envs
        self.state = tuple(
            s.view(self.num_actors, e, *s.shape[1:])
            for s in self.agent.initial_state(self.num_actors * e, self.device)
        )
        self.conns: dict[int, Connection] = {}
        self.pending: dict[int, int] = {}  # actor id -> the slot it begins (or NO_SLOT)
        self.first_request = 0.0

    def attach(self, actor_id: int, conn: Connection) -> None:
        """A (re)started actor: its new pipe replaces the old one, its envs' states reset."""
        self._detach(actor_id)
        self.conns[actor_id] = conn
        fresh = self.agent.initial_state(self.channels.num_envs, self.device)
        for state, initial in zip(self.state, fresh, strict=True):
            state[actor_id].copy_(initial)

    def _detach(self, actor_id: int) -> None:
        self.pending.pop(actor_id, None)
        conn = self.conns.pop(actor_id, None)
        if conn is not None:
            conn.close()

    def _receive(self, actor_id: int) -> None:
        try:
            (slot,) = REQUEST.unpack(self.conns[actor_id].recv_bytes())
        except (EOFError, OSError):  # the actor died; the learner restarts and re-attaches it
            self._detach(actor_id)
            return
        if not self.pending:
            self.first_request = time.monotonic()
        self.pending[actor_id] = slot

    def _due(self) -> bool:
        if not self.pending:
            return False
        everyone = len(self.pending) >= len(self.conns)
        return everyone or time.monotonic() - self.first_request >= self.timeout_s

    def serve(self) -> None:
        """One `agent.act` over the envs of every waiting actor; answer each of them."""
        if self.weights.latest_version() > self.version:
            self.version = self.weights.load_into(self.agent) or self.version
        ids = sorted(self.pending)
        k, e, d = len(ids), self.channels.num_envs, self.device
        index = torch.as_tensor(ids, dtype=torch.int64)
        index_d = index.to(d)
        state = tuple(s.index_select(0, index_d).flatten(0, 1) for s in self.state)
        for actor_id, slot in self.pending.items():
            if slot != NO_SLOT:  # the state before this step is the slot's initial state
                for saved, current in zip(self.buffers.initial_state, self.state, strict=True):
                    saved[slot].copy_(current[actor_id])
                self.buffers.version[slot] = self.version
        ch = self.channels

        def stacked(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index).flatten(0, 1).to(d, non_blocking=True)

        action, logits, _, state = self.agent.act(
            stacked(ch.obs), stacked(ch.reward), stacked(ch.done), stacked(ch.prev_action), state
        )
        for kept, new in zip(self.state, state, strict=True):
            kept.index_copy_(0, index_d, new.view(k, e, *new.shape[1:]))
        ch.action.index_copy_(0, index, action.view(k, e).cpu())
        ch.logits.index_copy_(0, index, logits.view(k, e, -1).float().cpu())
        for actor_id in ids:
            try:
                self.conns[actor_id].send_bytes(b"")
            except OSError:  # died while waiting; noticed on its next receive
                self._detach(actor_id)
        self.pending.clear()

    def run(self, control: Connection) -> None:
        """Serve until the learner sends None or closes `control`.

        Control messages: `("attach", actor_id)` followed by the actor pipe's file descriptor.
        """
        while True:
            timeout = IDLE_WAIT_S
            if self.pending:
                timeout = max(0.0, self.first_request + self.timeout_s - time.monotonic())
            by_conn = {conn: actor_id for actor_id, conn in self.conns.items()}
            for conn in wait([control, *by_conn], timeout):
                if conn is control:
                    message = control.recv()
                    if message is None:
                        return
                    _, actor_id = message
                    self.attach(actor_id, Connection(recv_handle(control)))
                elif by_conn[conn] in self.conns and self.conns[by_conn[conn]] is conn:
                    self._receive(by_conn[conn])
            if self._due():
                self.serve()
