"""Every recurrent core behind one interface (DESIGN §3), built by name with ``make_core``."""

from __future__ import annotations

from typing import Any

from torch import nn

from agents.cores.fwp import FWP_NAMES, FWPCore
from agents.cores.simple import FFCore, LSTMCore

CORE_NAMES = ("ff", "lstm", *FWP_NAMES)

_FWP_DEFAULTS: dict[str, Any] = {
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "head_dim": 32,
    "ff_size": 512,
    "dropout": 0.0,
    "state_grad": "full",
    "impl": "fast",
    "bf16": False,
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ff": {},
    "lstm": {"hidden_size": 256},
    **{name: _FWP_DEFAULTS for name in FWP_NAMES},
}
_CHOICES = {"state_grad": ("full", "none"), "impl": ("fast", "reference")}


def _check_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"core option {key} must be a positive int, got {value!r}")


def make_core(name: str, input_size: int, **options: Any) -> nn.Module:
    """Build core ``name`` for inputs of ``input_size`` features.

    Options (keyword only) and defaults: FWP cores (lt, delta, delta_rnn, delta_lstm, rdn) take
    hidden_size=128, num_layers=2, num_heads=4, head_dim=32, ff_size=512, dropout=0.0,
    state_grad="full" ("none" detaches the state between steps), impl="fast" ("reference" is
    the per-step oracle), bf16=False (True: the block's linear layers under bf16 autocast, the
    residual stream and the recurrence in f32); lstm takes hidden_size=256; ff takes none.
    Anything else raises ``ValueError`` naming the valid choices.
    """
    if name not in _DEFAULTS:
        raise ValueError(f"unknown core {name!r}; valid cores: {', '.join(CORE_NAMES)}")
    unknown = sorted(set(options) - set(_DEFAULTS[name]))
    if unknown:
        valid = ", ".join(_DEFAULTS[name]) or "none"
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for core {name!r}; valid: {valid}"
        )
    cfg = {**_DEFAULTS[name], **options}
    _check_positive_int("input_size", input_size)
    for key, value in cfg.items():
        if key in _CHOICES:
            if value not in _CHOICES[key]:
                raise ValueError(f"core option {key}={value!r}; valid: {', '.join(_CHOICES[key])}")
        elif key == "bf16":
            if not isinstance(value, bool):
                raise ValueError(f"core option bf16 must be true or false, got {value!r}")
        elif key == "dropout":
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
                raise ValueError(f"core option dropout must be a number in [0, 1), got {value!r}")
        else:
            _check_positive_int(key, value)
    if name == "ff":
        return FFCore(input_size)
    if name == "lstm":
        return LSTMCore(input_size, **cfg)
    return FWPCore(name, input_size, **cfg)


__all__ = ["CORE_NAMES", "FFCore", "FWPCore", "LSTMCore", "make_core"]
