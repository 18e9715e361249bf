"""V-trace off-policy targets (Espeholt et al. 2018, IMPALA, eq. 1 and Remark 1).

All tensors are time-major `[T, B]`. Episode ends enter only through the discounts
(`discount_t = 0` where step t ends an episode). Everything here is computed under
`torch.no_grad()` and returned detached: `vs` and `pg_advantages` are regression targets and
advantage weights, and the log-probabilities are returned only for logging. The learner computes
its own target log-probabilities, with gradient, for the policy-gradient loss.

The only Python loop is the backward recursion over T; nothing syncs with the device, so the
functions run unchanged on CUDA tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class VTraceReturns(NamedTuple):
    """V-trace results, all `[T, B]` and detached."""

    vs: torch.Tensor
    pg_advantages: torch.Tensor
    advantages: torch.Tensor  # r_s + γ_s v_{s+1} − V(x_s): pg_advantages before the ρ weight
    log_rhos: torch.Tensor
    behaviour_action_log_probs: torch.Tensor
    target_action_log_probs: torch.Tensor


def action_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[action]: logits `[T,B,A]`, actions `[T,B]` int64 -> `[T,B]`."""
    return F.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def _check_threshold(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be a positive number or None (no clipping), got {value!r}")


def _check_inputs(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None,
    clip_pg_rho_threshold: float | None,
    lambda_: float,
) -> None:
    if log_rhos.dim() != 2:
        raise ValueError(f"log_rhos must be [T, B], got shape {tuple(log_rhos.shape)}")
    shape = log_rhos.shape
    for name, x in (("discounts", discounts), ("rewards", rewards), ("values", values)):
        if x.shape != shape:
            raise ValueError(
                f"{name} must have shape [T, B] = {tuple(shape)}, got {tuple(x.shape)}"
            )
    if bootstrap_value.shape != shape[1:]:
        raise ValueError(
            f"bootstrap_value must have shape [B] = {tuple(shape[1:])}, "
            f"got {tuple(bootstrap_value.shape)}"
        )
    for name, x in (
        ("log_rhos", log_rhos),
        ("discounts", discounts),
        ("rewards", rewards),
        ("values", values),
        ("bootstrap_value", bootstrap_value),
    ):
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    _check_threshold("clip_rho_threshold", clip_rho_threshold)
    _check_threshold("clip_pg_rho_threshold", clip_pg_rho_threshold)
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_ must be in [0, 1], got {lambda_!r}")


def _clipped(rhos: torch.Tensor, threshold: float | None) -> torch.Tensor:
    return rhos if threshold is None else rhos.clamp(max=threshold)


@torch.no_grad()
def from_importance_weights(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """V-trace targets `vs` and policy-gradient advantages from log(π/μ) of the taken actions.

    rho_t = min(rho_bar, π/μ), c_t = λ·min(1, π/μ),
    v_s = V(x_s) + Σ_{t≥s} (Π_{i=s}^{t-1} γ_i c_i) rho_t (r_t + γ_t V(x_{t+1}) − V(x_t)),
    computed backwards as v_s − V(x_s) = δ_s + γ_s c_s (v_{s+1} − V(x_{s+1})), with
    V(x_T) = v_T = bootstrap_value. Advantage: min(pg_rho_bar, π/μ)·(r_s + γ_s v_{s+1} − V(x_s)).
    A threshold of None means no clipping. Returns `(vs, pg_advantages, advantages)`, all
    `[T, B]`, where `advantages` is the last factor alone (r_s + γ_s v_{s+1} − V(x_s)), before
    the ρ weight: what a PPO-style clipped surrogate weighs by π/μ itself.
    """
    _check_inputs(
        log_rhos,
        discounts,
        rewards,
        values,
        bootstrap_value,
        clip_rho_threshold,
        clip_pg_rho_threshold,
        lambda_,
    )
    rhos = torch.exp(log_rhos)
    clipped_rhos = _clipped(rhos, clip_rho_threshold)
    cs = lambda_ * rhos.clamp(max=1.0)

    values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
    deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)
    decays = discounts * cs

    vs_minus_values = torch.empty_like(values)
    acc = torch.zeros_like(bootstrap_value)
    for t in range(values.shape[0] - 1, -1, -1):
        acc = deltas[t] + decays[t] * acc
        vs_minus_values[t] = acc
    vs = values + vs_minus_values

    vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
    pg_rhos = _clipped(rhos, clip_pg_rho_threshold)
    advantages = rewards + discounts * vs_t_plus_1 - values
    return vs, pg_rhos * advantages, advantages


@torch.no_grad()
def from_logits(
    behaviour_logits: torch.Tensor,
    target_logits: torch.Tensor,
    actions: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
    lambda_: float = 1.0,
) -> VTraceReturns:
    """V-trace from behaviour (μ) and target (π) logits `[T,B,A]` and the taken actions `[T,B]`.

    See `from_importance_weights` for the definitions; all results are detached.
    """
    if behaviour_logits.dim() != 3 or behaviour_logits.shape != target_logits.shape:
        raise ValueError(
            "behaviour_logits and target_logits must both be [T, B, A] with the same shape, got "
            f"{tuple(behaviour_logits.shape)} and {tuple(target_logits.shape)}"
        )
    if actions.shape != behaviour_logits.shape[:2]:
        raise ValueError(
            f"actions must have shape [T, B] = {tuple(behaviour_logits.shape[:2])}, "
            f"got {tuple(actions.shape)}"
        )
    if actions.dtype != torch.int64:
        raise ValueError(f"actions must be int64 (torch.long), got {actions.dtype}")
    behaviour_lp = action_log_probs(behaviour_logits, actions)
    target_lp = action_log_probs(target_logits, actions)
    log_rhos = target_lp - behaviour_lp
    vs, pg_advantages, advantages = from_importance_weights(
        log_rhos,
        discounts,
        rewards,
        values,
        bootstrap_value,
        clip_rho_threshold,
        clip_pg_rho_threshold,
        lambda_,
    )
    return VTraceReturns(vs, pg_advantages, advantages, log_rhos, behaviour_lp, target_lp)
