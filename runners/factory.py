"""Builds environments, agents and rollout specs from a Config (the only place that maps keys).

Construction errors caused by user input (unknown game, bad sizes) surface as ConfigError,
one line, so the CLIs can report them without a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from agents import build_agent
from envs import make_vector_env
from envs.atari import ATARI_OPTIONS
from runners.config import Config, ConfigError
from runners.rollout import NUMPY_TO_TORCH, RolloutSpec


@dataclass(frozen=True)
class EnvInfo:
    obs_shape: tuple[int, ...]
    obs_dtype: torch.dtype
    num_actions: int


def make_env(cfg: Config, num_envs: int, seed: int):
    """A vector env of `num_envs` for this config (see envs.make_vector_env)."""
    env_cfg = cfg.env
    if env_cfg.kind == "atari":
        # every Atari option that is also a config key (frameskip keeps the env's default)
        options = {name: getattr(env_cfg, name) for name in ATARI_OPTIONS if hasattr(env_cfg, name)}
    else:
        options = {"kwargs": dict(env_cfg.kwargs)}
    try:
        return make_vector_env(
            env_cfg.kind, env_cfg.id, num_envs, seed, module=env_cfg.module, **options
        )
    except (ValueError, ImportError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def probe_env(cfg: Config) -> EnvInfo:
    """Observation shape/dtype and action count, from a one-env instance."""
    env = make_env(cfg, 1, cfg.seed)
    try:
        return EnvInfo(
            obs_shape=tuple(env.obs_shape),
            obs_dtype=NUMPY_TO_TORCH[np.dtype(env.obs_dtype)],
            num_actions=int(env.num_actions),
        )
    finally:
        env.close()


def core_kwargs(cfg: Config) -> dict:
    """Keyword arguments of make_core for the configured core."""
    c = cfg.core
    if cfg.agent.core == "ff":
        return {}
    if cfg.agent.core == "lstm":
        return {} if c.hidden_size is None else {"hidden_size": c.hidden_size}
    kwargs = {
        "num_layers": c.num_layers,
        "num_heads": c.num_heads,
        "head_dim": c.head_dim,
        "ff_size": c.ff_size,
        "dropout": c.dropout,
        "state_grad": c.state_grad,
        "bf16": c.bf16,
    }
    if c.hidden_size is not None:
        kwargs["hidden_size"] = c.hidden_size
    return kwargs


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 matmuls run natively (elsewhere oneDNN emulates them)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def torso_bf16(cfg: Config) -> bool:
    """`agent.bf16` resolved on this machine: `auto` is bf16 only where the CPU runs it natively."""
    return cpu_has_native_bf16() if cfg.agent.bf16 == "auto" else cfg.agent.bf16


def make_agent(cfg: Config, info: EnvInfo) -> torch.nn.Module:
    try:
        return build_agent(
            cfg.agent.torso,
            cfg.agent.core,
            info.obs_shape,
            info.num_actions,
            core_kwargs=core_kwargs(cfg),
            prev_action=cfg.agent.prev_action,
            bf16=torso_bf16(cfg),
            init=cfg.agent.init,
            center_obs=cfg.agent.center_obs,
        )
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


def rollout_spec(cfg: Config, info: EnvInfo, agent: torch.nn.Module) -> RolloutSpec:
    state = agent.initial_state(1)
    return RolloutSpec(
        unroll_length=cfg.learner.unroll_length,
        num_envs=cfg.env.num_envs // cfg.runtime.num_actors,
        obs_shape=info.obs_shape,
        obs_dtype=info.obs_dtype,
        num_actions=info.num_actions,
        state_shapes=tuple(tuple(s.shape[1:]) for s in state),
    )
