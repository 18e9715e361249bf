"""Typed configuration: dataclass sections, YAML presets and `section.key=value` overrides.

Every key has a type, a default and one line of help; the resolved config is plain data so it
can be saved next to a run and inside checkpoints (which load with `weights_only=True`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_PRESET = CONFIG_DIR / "default.yaml"
CORE_CHOICES = ("ff", "lstm", "lt", "delta", "delta_rnn", "delta_lstm", "rdn")
INIT_CHOICES = ("orthogonal", "orthogonal_core", "default")


class ConfigError(ValueError):
    """A user-facing configuration problem, reported as one line."""


def _key(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None):
    """A config field with its help line and optional validation."""
    meta = {"help": help, "choices": choices, "min": minimum}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class EnvConfig:
    kind: str = _key("atari", "environment family", choices=("atari", "gym"))
    id: str = _key("pong", "Atari game (pong, Pong, ALE/Pong-v5, ...) or gymnasium id")
    module: str | None = _key(None, "python module imported first (registers a gymnasium id)")
    num_envs: int = _key(32, "environments in total, split evenly across actors", minimum=1)
    num_threads: int = _key(0, "emulator threads per actor (0: automatic)", minimum=0)
    repeat_action_probability: float = _key(
        0.0, "sticky actions (0.25 is the modern protocol)", minimum=0.0
    )
    full_action_space: bool = _key(False, "use all 18 Atari actions")
    episodic_life: bool = _key(False, "a lost life ends the episode for learning")
    noop_max: int = _key(30, "up to this many no-ops at episode start", minimum=0)
    max_episode_frames: int = _key(108_000, "frame cap per episode (emulator frames)", minimum=1)
    kwargs: dict = _key({}, "extra keyword arguments for gymnasium.make (env.kind=gym)")


@dataclass
class AgentConfig:
    torso: str = _key("nature", "observation encoder", choices=("impala", "nature", "mlp"))
    core: str = _key("rdn", "recurrent core", choices=CORE_CHOICES)
    prev_action: bool = _key(False, "feed the one-hot previous action to the core")
    bf16: bool | str = _key(
        False,
        "run the torso under bf16 autocast (auto: where the CPU runs bf16 natively)",
        choices=(False, True, "auto"),
    )
    init: str = _key(
        "default",
        "torso/head initialisation (orthogonal: see agents.initialize_)",
        choices=INIT_CHOICES,
    )
    center_obs: bool = _key(False, "conv torsos: subtract each frame's mean pixel")


@dataclass
class CoreConfig:
    hidden_size: int | None = _key(
        None, "core width (None: 128 for FWP cores, 256 for lstm)", minimum=1
    )
    num_layers: int = _key(2, "FWP layers", minimum=1)
    num_heads: int = _key(4, "fast-weight heads per layer", minimum=1)
    head_dim: int = _key(32, "size of each head's key/value", minimum=1)
    ff_size: int = _key(512, "feed-forward width inside each FWP layer", minimum=1)
    dropout: float = _key(0.0, "dropout inside FWP layers", minimum=0.0)
    state_grad: str = _key(
        "full", "back-propagate through the fast weights", choices=("full", "none")
    )
    bf16: bool = _key(
        False, "FWP cores: linear layers under bf16 autocast (recurrences and residual stream f32)"
    )


@dataclass
class LearnerConfig:
    unroll_length: int = _key(50, "T: agent steps per rollout", minimum=1)
    batch_size: int = _key(32, "B: trajectories per learner batch", minimum=1)
    gamma: float = _key(0.99, "discount", minimum=0.0)
    learning_rate: float = _key(6e-4, "initial learning rate", minimum=0.0)
    lr_schedule: str = _key(
        "linear",
        "learning-rate decay to 0 over lr_decay_steps",
        choices=("linear", "constant"),
    )
    lr_decay_steps: int = _key(
        0,
        "agent steps over which the linear schedule reaches 0, then stays there "
        "(0: runtime.total_steps)",
        minimum=0,
    )
    warmup_steps: int = _key(
        0, "agent steps over which the learning rate rises linearly from 0 (0: none)", minimum=0
    )
    optimizer: str = _key("rmsprop", "optimizer", choices=("rmsprop", "adam"))
    rmsprop_alpha: float = _key(0.99, "RMSprop smoothing constant", minimum=0.0)
    rmsprop_eps: float = _key(0.01, "RMSprop/Adam epsilon", minimum=0.0)
    momentum: float = _key(0.0, "RMSprop momentum", minimum=0.0)
    grad_clip: float = _key(40.0, "global gradient-norm clip (0: off)", minimum=0.0)
    baseline_cost: float = _key(0.5, "weight of the value loss", minimum=0.0)
    entropy_cost: float = _key(0.01, "weight of the entropy bonus", minimum=0.0)
    entropy_decay: bool = _key(
        False,
        "decay the entropy cost linearly to 0 over the learning rate's horizon "
        "(lr_decay_steps, or runtime.total_steps), whatever lr_schedule says",
    )
    kl_cost: float = _key(
        0.0,
        "weight of a penalty on the KL from the actors' policy to the learner's, summed like the "
        "other losses: it holds back the drift of the updates since the batch was collected",
        minimum=0.0,
    )
    ppo_clip: float = _key(
        0.0,
        "PPO's clipped surrogate against the actors' policy (APPO): the policy-gradient term "
        "becomes min(r A, clip(r, 1-c, 1+c) A) with r = pi/mu and A = r_s + gamma v_{s+1} - V, "
        "so steps already moved more than c stop pulling (0: off, plain V-trace)",
        minimum=0.0,
    )
    reward_clip: float = _key(1.0, "clamp rewards to [-c, c] for learning (0: off)", minimum=0.0)
    clip_rho: float = _key(1.0, "V-trace rho-bar", minimum=0.0)
    clip_pg_rho: float = _key(
        1.0, "V-trace rho-bar for the policy-gradient advantages", minimum=0.0
    )
    lambda_: float = _key(1.0, "V-trace lambda", minimum=0.0)
    normalize_advantages: bool = _key(
        False, "scale the policy-gradient advantages of each batch to zero mean, unit std"
    )
    max_nan_updates: int = _key(10, "stop after this many non-finite updates in a row", minimum=1)


@dataclass
class RuntimeConfig:
    backend: str = _key("local", "actor/learner runtime", choices=("local", "sync", "ray"))
    total_steps: int = _key(
        10_000_000, "agent steps to train for (1 step = frameskip frames)", minimum=1
    )
    time_limit_s: float = _key(
        0.0, "stop after this many seconds of training (0: no limit)", minimum=0.0
    )
    num_actors: int = _key(2, "actor processes", minimum=1)
    device: str = _key("auto", "learner device", choices=("auto", "cpu", "cuda"))
    learner_threads: int = _key(
        0,
        "torch threads of the learner (0: on the sync backend every core, otherwise the cores "
        "minus those of the actors and of a CPU inference server, at least 1; a tiny model on a "
        "shared machine runs better with 1)",
        minimum=0,
    )
    actor_threads: int = _key(1, "torch threads per actor process", minimum=1)
    inference: str = _key(
        "actor",
        "who acts: each actor's CPU copy, or one server batching all envs (GPU if available)",
        choices=("actor", "central"),
    )
    inference_timeout_ms: float = _key(
        2.0,
        "central inference: serve before every actor asked, this long after the first request",
        minimum=0.0,
    )
    num_buffers: int = _key(
        0,
        "rollout slots in shared memory, shared by the actors (0: two per actor or more, so "
        "actors never wait; fewer: less policy lag)",
        minimum=0,
    )
    max_policy_lag: int = _key(
        0, "drop rollouts older than this many updates (0: keep all)", minimum=0
    )
    actor_timeout_s: float = _key(120.0, "restart an actor silent for this long", minimum=1.0)
    ray_address: str = _key("local", "Ray cluster: local, auto or host:port")
    ray_num_cpus_per_sampler: float = _key(1.0, "CPUs each Ray sampler reserves", minimum=0.0)
    ray_num_gpus_per_sampler: float = _key(
        0.0, "GPUs each Ray sampler reserves (> 0: it acts on its node's GPU)", minimum=0.0
    )
    ray_resources: dict = _key({}, "custom Ray resources each sampler reserves, e.g. {sampler: 1}")


@dataclass
class CheckpointConfig:
    every_s: float = _key(600.0, "seconds between checkpoints", minimum=1.0)
    keep_last: int = _key(3, "checkpoints kept besides milestones", minimum=1)
    milestones: list = _key([], "agent steps whose checkpoint is kept forever")


@dataclass
class LoggingConfig:
    tensorboard: bool = _key(True, "write TensorBoard summaries under <run>/tb")
    every_s: float = _key(5.0, "seconds between console lines and scalar summaries", minimum=0.1)


@dataclass
class EvalConfig:
    every_steps: int = _key(0, "evaluate during training every this many steps (0: off)", minimum=0)
    episodes: int = _key(10, "episodes per evaluation", minimum=1)


@dataclass
class VideoConfig:
    every_steps: int = _key(
        0, "record a gameplay video during training every this many steps", minimum=0
    )


@dataclass
class RunConfig:
    dir: str | None = _key(None, "run folder (default runs/<game>-<core>-<time>)")
    restart: bool = _key(False, "start over even if the run folder has checkpoints")


@dataclass
class Config:
    env: EnvConfig = field(default_factory=EnvConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    core: CoreConfig = field(default_factory=CoreConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = _key(0, "random seed", minimum=0)


def _sections() -> dict[str, type]:
    return {f.name: f.default_factory for f in dataclasses.fields(Config) if f.name != "seed"}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(_sections()[section])}


def all_keys() -> list[str]:
    """Every dotted key, in declaration order."""
    keys = [f"{s}.{k}" for s in _sections() for k in _fields(s)]
    return keys + ["seed"]


def _closest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    return f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(choices)}"


def _coerce(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Check `value` against the field's type, choices and minimum; return the typed value."""
    hint = typing.get_type_hints(_owner(key))[f.name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    bases = tuple(a for a in typing.get_args(hint) if a is not type(None)) if union else (hint,)
    base, expected = bases[0], " or ".join(b.__name__ for b in bases)
    if value is None:
        if union and type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{key} may not be empty (expected {expected})")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if base is int and isinstance(value, float) and value.is_integer() and abs(value) >= 1e3:
        value = int(value)  # allow 2e8 for step counts
    ok = isinstance(value, bases) and not (isinstance(value, bool) and bool not in bases)
    if not ok:
        raise ConfigError(f"{key} must be {expected}, got {type(value).__name__} {value!r}")
    if base is float and math.isnan(value):
        raise ConfigError(f"{key} must be a number, got nan")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choices: {_spell(choices, ', ')}")
    minimum = f.metadata.get("min")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key}={value!r} must be >= {minimum}")
    if base is list and not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ConfigError(f"{key} must be a list of integers >= 0, got {value!r}")
    return value


def _spell(choices: tuple, separator: str) -> str:
    """Choices as a user types them (YAML's true/false for booleans)."""
    return separator.join(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)


def _owner(key: str) -> type:
    return Config if key == "seed" else _sections()[key.split(".")[0]]


def _field(key: str) -> dataclasses.Field:
    """The field for a dotted key, or a ConfigError naming the valid keys."""
    if key == "seed":
        return next(f for f in dataclasses.fields(Config) if f.name == "seed")
    section, _, name = key.partition(".")
    sections = list(_sections())
    if section not in sections or not name:
        raise ConfigError(f"unknown config key {key!r}; {_closest(section, sections + ['seed'])}")
    fields = _fields(section)
    if name not in fields:
        close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.4)
        close += [k for k in fields if name in k and k not in close]
        names = close or list(fields)
        hint = "did you mean" if close else "valid keys:"
        raise ConfigError(
            f"unknown config key {key!r}; {hint} {', '.join(f'{section}.{k}' for k in names)}"
        )
    return fields[name]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Nested preset mapping -> dotted keys; `kwargs` dicts stay whole."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, dict) and key in _sections():
            flat.update(_flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def apply(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key (e.g. `env.kwargs.delay`) after validating it."""
    if key.startswith("env.kwargs."):
        cfg.env.kwargs[key.removeprefix("env.kwargs.")] = value
        return
    f = _field(key)
    typed = _coerce(key, value, f)
    if key == "seed":
        cfg.seed = typed
    else:
        section, name = key.split(".", 1)
        setattr(getattr(cfg, section), name, typed)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (so 1e-3, true, [1, 2], {a: 1} work)."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as a string
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


def load_preset(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset into dotted keys."""
    path = Path(path)
    if not path.is_file():
        presets = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"config file {str(path)!r} not found; presets in configs/: {presets}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]
        ) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {str(path)!r} must be a mapping of sections")
    return _flatten(tree)


def build_config(preset: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the preset (default: configs/default.yaml), then command-line overrides."""
    cfg = Config()
    for key, value in load_preset(preset or DEFAULT_PRESET).items():
        apply(cfg, key, value)
    for text in overrides:
        apply(cfg, *parse_override(text))
    validate(cfg)
    return cfg


def check_environment() -> None:
    """The environment variables that steer a run, checked before anything starts."""
    from agents.linear import route  # here: importing the agents package imports torch

    try:
        route()
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def validate(cfg: Config) -> None:
    """Checks that involve several keys."""
    per_actor, rest = divmod(cfg.env.num_envs, cfg.runtime.num_actors)
    if rest or per_actor == 0:
        raise ConfigError(
            f"env.num_envs={cfg.env.num_envs} must be a positive multiple of "
            f"runtime.num_actors={cfg.runtime.num_actors}"
        )
    for name, amount in cfg.runtime.ray_resources.items():
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(
                f"runtime.ray_resources.{name}={amount!r} must be a non-negative number"
            )
    if cfg.runtime.inference == "central" and cfg.runtime.backend != "local":
        raise ConfigError(
            f"runtime.inference=central needs runtime.backend=local, not {cfg.runtime.backend}"
        )
    if cfg.learner.batch_size % per_actor:
        raise ConfigError(
            f"learner.batch_size={cfg.learner.batch_size} must be a multiple of the envs per "
            f"actor ({per_actor} = env.num_envs / runtime.num_actors)"
        )
    needed = max(cfg.runtime.num_actors, cfg.learner.batch_size // per_actor)
    if 0 < cfg.runtime.num_buffers < needed:
        raise ConfigError(
            f"runtime.num_buffers={cfg.runtime.num_buffers} is too few: every actor needs a "
            f"slot and a batch needs {cfg.learner.batch_size // per_actor}, so at least {needed} "
            "(0: the default)"
        )


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (YAML- and weights_only-safe)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output, validating every key."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        apply(cfg, key, value)
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def help_text(defaults: Config) -> str:
    """Every key with its value in `defaults` and its help line, for `train.py --help`."""
    lines = []
    for key in all_keys():
        f = _field(key)
        section, _, name = key.partition(".")
        default = defaults.seed if key == "seed" else getattr(getattr(defaults, section), name)
        choices = f.metadata.get("choices")
        extra = f" [{_spell(choices, '|')}]" if choices else ""
        lines.append(f"  {key:<34} {default!r:<12} {f.metadata['help']}{extra}")
    return "\n".join(lines)
