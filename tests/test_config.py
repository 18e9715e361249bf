"""Config system: presets, overrides, types, error lines, --help."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from runners import factory, trainer
from runners.config import (
    CONFIG_DIR,
    ConfigError,
    all_keys,
    build_config,
    dump_yaml,
    from_dict,
    to_dict,
)
from runners.factory import EnvInfo, core_kwargs, make_agent

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("preset", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_presets_load_and_round_trip(preset):
    cfg = build_config(preset)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg


def test_paper_preset_has_every_setting_of_design_section_5():
    cfg = build_config(CONFIG_DIR / "paper.yaml")
    lr = cfg.learner
    assert (lr.unroll_length, lr.batch_size, cfg.env.num_envs) == (50, 32, 48)
    assert (lr.gamma, lr.learning_rate, lr.rmsprop_alpha, lr.rmsprop_eps) == (
        0.99,
        6e-4,
        0.99,
        0.01,
    )
    assert (lr.momentum, lr.grad_clip, lr.baseline_cost, lr.entropy_cost) == (0.0, 40.0, 0.5, 0.01)
    assert (lr.clip_rho, lr.clip_pg_rho, lr.lambda_, lr.lr_schedule) == (1.0, 1.0, 1.0, "linear")
    assert lr.optimizer == "rmsprop" and lr.reward_clip == 1.0
    assert cfg.runtime.total_steps == 200_000_000 and cfg.checkpoint.milestones == [50_000_000]
    assert cfg.env.episodic_life and cfg.env.repeat_action_probability == 0.0
    assert (cfg.env.noop_max, cfg.env.max_episode_frames) == (30, 108_000)
    assert cfg.agent.torso == "impala" and not cfg.agent.prev_action
    core = cfg.core
    assert (core.hidden_size, core.num_heads, core.head_dim, core.ff_size) == (128, 4, 32, 512)
    assert (core.num_layers, core.dropout) == (2, 0.0)


def test_overrides_are_typed():
    cfg = build_config(
        None,
        [
            "learner.learning_rate=1e-3",
            "runtime.total_steps=2e6",
            "agent.core=delta",
            "env.kwargs.delay=4",
            "checkpoint.milestones=[10, 20]",
            "core.hidden_size=64",
            "env.module=envs.memory",
            "seed=3",
        ],
    )
    assert cfg.learner.learning_rate == 1e-3 and isinstance(cfg.learner.learning_rate, float)
    assert cfg.runtime.total_steps == 2_000_000 and isinstance(cfg.runtime.total_steps, int)
    assert cfg.agent.core == "delta" and cfg.env.kwargs == {"delay": 4}
    assert cfg.checkpoint.milestones == [10, 20] and cfg.core.hidden_size == 64
    assert cfg.env.module == "envs.memory" and cfg.seed == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("env.foo=1", "unknown config key 'env.foo'"),
        ("learner.learning_rat=1", "did you mean learner.learning_rate"),
        ("nosuch.key=1", "valid: env, agent"),
        ("agent.core=rdm", "choices: ff, lstm, lt, delta, delta_rnn, delta_lstm, rdn"),
        ("agent.torso=resnet", "choices: impala, nature, mlp"),
        ("learner.gamma=abc", "learner.gamma must be float"),
        ("runtime.num_actors=1.5", "runtime.num_actors must be int"),
        ("agent.bf16=1", "agent.bf16 must be bool or str, got int 1"),
        ("agent.bf16=always", "agent.bf16='always' is not valid; choices: false, true, auto"),
        ("seed=-1", "seed=-1 must be >= 0"),
        ("learner.batch_size=0", "must be >= 1"),
        ("checkpoint.milestones=[a]", "list of integers"),
        ("env.id=", "env.id may not be empty"),
        ("runtime.num_actors=3", "multiple of runtime.num_actors"),
        ("learner.batch_size=8", "multiple of the envs per actor"),
        ("runtime.num_buffers=1", "runtime.num_buffers=1 is too few: every actor needs a slot"),
        ("novalue", "not of the form section.key=value"),
    ],
)
def test_bad_overrides_give_one_clear_line(override, message):
    with pytest.raises(ConfigError) as info:
        build_config(None, [override])
    text = str(info.value)
    assert message in text and "\n" not in text


def test_missing_or_broken_preset(tmp_path):
    with pytest.raises(ConfigError, match="not found; presets in configs/: default.yaml"):
        build_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("env: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        build_config(broken)
    typo = tmp_path / "typo.yaml"
    typo.write_text("learner:\n  learnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match="learner.learnin_rate"):
        build_config(typo)


def test_help_lists_every_key():
    out = subprocess.run(
        [sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0
    for key in all_keys():
        assert f"  {key} " in out.stdout


def test_cli_error_is_one_line_and_writes_nothing(tmp_path):
    out = subprocess.run(
        [sys.executable, "train.py", f"run.dir={tmp_path / 'run'}", "agent.core=nope"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "agent.core='nope'" in out.stderr
    assert not (tmp_path / "run").exists()


def test_core_bf16_reaches_fwp_cores_only():
    assert core_kwargs(build_config(None, ["core.bf16=true"]))["bf16"] is True
    assert "bf16" not in core_kwargs(build_config(None, ["core.bf16=true", "agent.core=lstm"]))


def test_bf16_advice_warns_where_emulated_and_hints_where_native(monkeypatch):
    asked = build_config(CONFIG_DIR / "default.yaml", ["agent.bf16=true"])
    not_asked = build_config(CONFIG_DIR / "default.yaml", ["agent.bf16=false"])
    auto = build_config(CONFIG_DIR / "default.yaml", ["agent.bf16=auto"])
    mlp = build_config(CONFIG_DIR / "default.yaml", ["agent.bf16=false", "agent.torso=mlp"])
    monkeypatch.setattr(factory, "cpu_has_native_bf16", lambda: True)
    assert trainer.bf16_advice(asked) is None
    level, hint = trainer.bf16_advice(not_asked)
    assert level == logging.INFO and "agent.bf16=true" in hint
    level, line = trainer.bf16_advice(auto)
    assert level == logging.INFO and line == "agent.bf16=auto: the torso runs in bf16 autocast"
    assert trainer.bf16_advice(mlp) is None
    monkeypatch.setattr(factory, "cpu_has_native_bf16", lambda: False)
    level, warning = trainer.bf16_advice(asked)
    assert level == logging.WARNING
    assert "agent.bf16 set" in warning and "set agent.bf16=false" in warning
    assert trainer.bf16_advice(not_asked) is None
    level, line = trainer.bf16_advice(auto)
    assert level == logging.INFO and "float32 (this CPU has no native bf16)" in line


@pytest.mark.parametrize("native", [True, False])
def test_bf16_auto_follows_the_cpu_and_explicit_values_do_not(monkeypatch, native):
    monkeypatch.setattr(factory, "cpu_has_native_bf16", lambda: native)
    info = EnvInfo((4, 84, 84), torch.uint8, 6)
    for setting, expected in (("auto", native), ("true", True), ("false", False)):
        cfg = build_config(CONFIG_DIR / "default.yaml", [f"agent.bf16={setting}"])
        assert from_dict(to_dict(cfg)).agent.bf16 == cfg.agent.bf16  # saved as written
        assert make_agent(cfg, info).torso.bf16 is expected
