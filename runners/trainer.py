"""The training loop behind train.py: run folder, resume, learner, backend, logs, checkpoints."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents.cores import cpu_kernels
from runners import factory
from runners.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    restore_rng_state,
)
from runners.config import (
    Config,
    ConfigError,
    apply,
    build_config,
    check_environment,
    dump_yaml,
    from_dict,
    load_preset,
    parse_override,
    to_dict,
    validate,
)
from runners.evaluation import spawn_periodic_evaluation
from runners.factory import make_agent, probe_env, rollout_spec
from runners.inference_server import inference_device
from runners.learner import Learner, NonFiniteError
from runners.local import BackendError, LocalBackend, SyncBackend
from runners.metrics import (
    IntervalPeaks,
    MetricsLogger,
    ProgressLine,
    close_run_logging,
    setup_run_logging,
)

log = logging.getLogger("deltabeast")

CHECKPOINT_FORMAT = 1


def default_run_dir(cfg: Config) -> Path:
    game = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.env.id).strip("_")
    return Path("runs") / f"{game}-{cfg.agent.core}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_config(preset: str | None, overrides: list[str]) -> Config:
    """The run's config: a resumed run starts from its saved config.yaml, then the overrides.

    A new run (or run.restart=true) starts from the preset, as `build_config` does.
    """
    check_environment()
    parsed = [parse_override(text) for text in overrides]
    run_dir = next((v for k, v in parsed if k == "run.dir"), None)
    restart = next((v for k, v in parsed if k == "run.restart"), False)
    saved = Path(str(run_dir)) / "config.yaml" if run_dir else None
    if saved is None or not saved.is_file() or restart is True:
        return build_config(preset, overrides)
    if preset:
        log.warning(
            "resuming %s: its saved config is used, --config %s is ignored", run_dir, preset
        )
    cfg = from_dict({})
    for key, value in load_preset(saved).items():
        apply(cfg, key, value)
    for key, value in parsed:
        apply(cfg, key, value)
    validate(cfg)
    return cfg


def learner_device(cfg: Config) -> torch.device:
    if cfg.runtime.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device=cuda but no CUDA device is available; use auto or cpu")
    if cfg.runtime.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.runtime.device)


def learner_threads(cfg: Config) -> int:
    """torch threads of the learner: the cores that actors (and a CPU inference server) leave."""
    if cfg.runtime.learner_threads:
        return cfg.runtime.learner_threads
    if cfg.runtime.backend == "sync":
        return os.cpu_count() or 1
    processes = cfg.runtime.num_actors
    if cfg.runtime.inference == "central" and inference_device(cfg).type == "cpu":
        processes += 1
    return max(1, (os.cpu_count() or 1) - processes * cfg.runtime.actor_threads)


def bf16_advice(cfg: Config) -> tuple[int, str] | None:
    """A log level and line about bf16 autocast and this CPU, or None.

    A warning when it is asked for on a CPU that would only emulate it (the actors always act on
    the CPU, so they would run slower than in float32); a hint when a conv torso runs in float32
    on a CPU with native bf16, where `agent.bf16=true` is the faster choice; what `auto` chose.
    """
    asked = [
        key
        for key, on in (("agent.bf16", cfg.agent.bf16 is True), ("core.bf16", cfg.core.bf16))
        if on
    ]
    native = factory.cpu_has_native_bf16()
    if asked and not native:
        return logging.WARNING, (
            f"{' and '.join(asked)} set, but this CPU has no native bf16 (AVX512-BF16 or AMX): "
            f"autocast will be emulated and likely slower than float32; set {asked[0]}=false"
        )
    if cfg.agent.bf16 == "auto" and cfg.agent.torso in ("nature", "impala"):
        chosen = "bf16 autocast" if native else "float32 (this CPU has no native bf16)"
        return logging.INFO, f"agent.bf16=auto: the torso runs in {chosen}"
    if native and cfg.agent.bf16 is False and cfg.agent.torso in ("nature", "impala"):
        return logging.INFO, (
            "this CPU runs bf16 natively: agent.bf16=true runs the torso under bf16 autocast, "
            "1.3-1.8x the training throughput (docs/benchmarks.md)"
        )
    return None


def make_backend(cfg: Config, info, spec, agent):
    if cfg.runtime.backend == "sync":
        return SyncBackend(cfg, info, spec, agent)
    if cfg.runtime.backend == "local":
        return LocalBackend(cfg, info, spec, agent)
    from runners.ray_backend import RayBackend  # Ray is optional: import it only when asked

    return RayBackend(cfg, info, spec, agent)


def _archive_previous(run_dir: Path) -> None:
    """run.restart: move the old run's checkpoints and logs aside instead of deleting them."""
    old = [
        run_dir / name for name in ("checkpoints", "tb", "train.log") if (run_dir / name).exists()
    ]
    if not old:
        return
    archive = run_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    archive.mkdir(parents=True)
    for path in old:
        shutil.move(str(path), archive / path.name)


def _write_config(run_dir: Path, cfg: Config) -> None:
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(dump_yaml(cfg))
    os.replace(tmp, run_dir / "config.yaml")


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.previous = {
            sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run in `run_dir`; `run()` returns the process exit code."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir) if cfg.run.dir else default_run_dir(cfg)
        cfg.run.dir = str(self.run_dir)
        self.device = learner_device(cfg)
        if cfg.runtime.backend == "ray":  # fail before anything is written if Ray is missing
            from runners.ray_backend import import_ray

            import_ray()
        self.info = probe_env(cfg)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        self.agent = make_agent(cfg, self.info).to(self.device)
        if cfg.agent.core in cpu_kernels.CORES:  # built once here, not by every actor at once
            cpu_kernels.library()
        self.learner = Learner(self.agent, cfg.learner, cfg.runtime.total_steps, self.device)
        self.eval_process = None
        self.checkpoints = CheckpointManager(
            self.run_dir / "checkpoints",
            keep_last=cfg.checkpoint.keep_last,
            milestones=cfg.checkpoint.milestones,
        )

    def _payload(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "steps": self.learner.steps,
            "game": self.cfg.env.id,
            "core": self.cfg.agent.core,
            "num_actions": self.info.num_actions,
            "obs_shape": list(self.info.obs_shape),
            "config": to_dict(self.cfg),
            "agent": self.agent.state_dict(),
            "learner": self.learner.state_dict(),
            "rng": capture_rng_state(),
        }

    def save(self) -> Path | None:
        try:
            path = self.checkpoints.save(self.learner.steps, self._payload())
        except CheckpointError as exc:
            log.error("checkpoint not saved: %s (the previous one is kept)", exc)
            return None
        log.info("checkpoint %s", path)
        return path

    def _periodic_evaluation(self, previous_step: int) -> None:
        """Evaluate (and film) a fresh checkpoint in a separate process when a period ends."""
        step = self.learner.steps

        def due(every: int) -> bool:
            return every > 0 and step // every > previous_step // every

        evaluate, film = due(self.cfg.eval.every_steps), due(self.cfg.video.every_steps)
        if not (evaluate or film):
            return
        if self.eval_process is not None and self.eval_process.poll() is None:
            log.warning("evaluation at step %d skipped: the previous one is still running", step)
            return
        path = self.save()
        if path is not None:
            self.eval_process = spawn_periodic_evaluation(
                self.run_dir, path, step, self.cfg.eval.episodes, video=film
            )

    def _stop_evaluation(self) -> None:
        if self.eval_process is not None and self.eval_process.poll() is None:
            self.eval_process.terminate()
            try:
                self.eval_process.wait(10)
            except subprocess.TimeoutExpired:
                self.eval_process.kill()
                self.eval_process.wait(10)

    def _resume(self) -> None:
        loaded = self.checkpoints.load_latest(map_location=self.device)
        if loaded is None:
            return
        payload, path = loaded
        if payload.get("num_actions") != self.info.num_actions:
            raise ConfigError(
                f"checkpoint {path} has {payload.get('num_actions')} actions, this env has "
                f"{self.info.num_actions}; use another run.dir or run.restart=true"
            )
        try:
            self.agent.load_state_dict(payload["agent"])
        except RuntimeError:
            raise ConfigError(
                f"checkpoint {path} was trained with another agent (core {payload.get('core')}); "
                "use another run.dir or run.restart=true"
            ) from None
        self.learner.load_state_dict(payload["learner"])
        restore_rng_state(payload["rng"])
        log.info("resumed from %s at step %d", path, self.learner.steps)

    def run(self) -> int:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.run.restart:
            _archive_previous(self.run_dir)
        setup_run_logging(self.run_dir)
        torch.set_num_threads(learner_threads(cfg))
        if not cfg.run.restart:
            self._resume()
        _write_config(self.run_dir, cfg)
        log.info(
            "run %s: %s on %s, core %s, backend %s, learner on %s",
            self.run_dir,
            cfg.agent.torso,
            cfg.env.id,
            cfg.agent.core,
            cfg.runtime.backend,
            self.device,
        )
        if advice := bf16_advice(cfg):
            log.log(*advice)
        metrics = MetricsLogger(
            self.run_dir, cfg.logging.tensorboard, purge_step=self.learner.steps or None
        )
        progress = ProgressLine(cfg.runtime.total_steps, start_step=self.learner.steps)
        stop = _StopFlag()
        backend = None
        code = 0
        try:
            spec = rollout_spec(cfg, self.info, self.agent)
            backend = make_backend(cfg, self.info, spec, self.agent)
            backend.publish(self.agent.state_dict(), self.learner.updates)
            code = self._loop(backend, metrics, progress, stop)
        except (BackendError, NonFiniteError) as exc:
            log.error("%s", exc)
            code = 1
        finally:
            stop.restore()
            self._stop_evaluation()
            if backend is not None:
                backend.close()
            progress.close(self.learner.steps)
            self.save()
            metrics.close()
        return code

    def _loop(
        self, backend, metrics: MetricsLogger, progress: ProgressLine, stop: _StopFlag
    ) -> int:
        cfg = self.cfg
        last_log = last_ckpt = time.monotonic()
        wait_s = learn_s = 0.0
        steps_at_log = self.learner.steps
        peaks = IntervalPeaks()
        deadline = time.monotonic() + cfg.runtime.time_limit_s if cfg.runtime.time_limit_s else None
        while self.learner.steps < cfg.runtime.total_steps:
            if stop.reason is not None:
                log.info("%s received: stopping", stop.reason)
                break
            if deadline is not None and time.monotonic() >= deadline:
                log.info("runtime.time_limit_s reached: stopping")
                break
            start = time.perf_counter()
            batch = backend.next_batch(timeout_s=1.0)
            wait_s += time.perf_counter() - start
            if batch is None:
                continue
            start = time.perf_counter()
            previous_step = self.learner.steps
            stats = self.learner.update(batch.to(self.device))
            backend.publish(self.agent.state_dict(), self.learner.updates)
            learn_s += time.perf_counter() - start
            peaks.add(stats)
            step = self.learner.steps
            returns, lengths = batch.finished_episodes()
            progress.add_returns(returns)
            for ret, length in zip(returns.tolist(), lengths.tolist(), strict=True):
                metrics.scalar("charts/episodic_return", ret, step)
                metrics.scalar("charts/episodic_length", length, step)
            progress.update(step)
            now = time.monotonic()
            if now - last_log >= cfg.logging.every_s:
                elapsed = now - last_log
                scalars = {k: float(v) for k, v in stats.items()}
                scalars.update(peaks.drain())
                scalars["charts/SPS"] = (step - steps_at_log) / elapsed
                scalars["perf/learner_s"] = learn_s
                scalars["perf/batch_wait_s"] = wait_s
                scalars["perf/actor_restarts"] = backend.restarts()
                scalars["perf/dropped_rollouts"] = backend.dropped_rollouts
                scalars["perf/skipped_updates"] = self.learner.skipped_updates
                for name, seconds in backend.timings.items():
                    scalars[f"perf/{name}"] = seconds
                metrics.scalars(scalars, step)
                backend.timings.clear()
                last_log, steps_at_log, wait_s, learn_s = now, step, 0.0, 0.0
            if now - last_ckpt >= cfg.checkpoint.every_s:
                self.save()
                last_ckpt = now
            self._periodic_evaluation(previous_step)
        return 0


def run_training(cfg: Config) -> int:
    """Entry point used by train.py."""
    try:
        return Trainer(cfg).run()
    except (ConfigError, CheckpointError) as exc:
        print(f"train.py: error: {exc}", file=sys.stderr)
        return 2
    finally:
        close_run_logging()
