"""V-trace against a numpy transcription of the IMPALA paper's definition (explicit sums)."""

import math

import numpy as np
import pytest
import torch

from runners.vtrace import from_importance_weights, from_logits


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _reference(
    behaviour_logits, target_logits, actions, discounts, rewards, values, bootstrap,
    clip_rho, clip_pg_rho, lambda_,
):  # fmt: skip
    """Eq. 1 of Espeholt et al. 2018 as an explicit double sum, float64, one column at a time."""
    T, B = actions.shape
    lp_mu = np.take_along_axis(_log_softmax(behaviour_logits), actions[..., None], -1)[..., 0]
    lp_pi = np.take_along_axis(_log_softmax(target_logits), actions[..., None], -1)[..., 0]
    ratio = np.exp(lp_pi - lp_mu)
    rho = ratio if clip_rho is None else np.minimum(clip_rho, ratio)
    pg_rho = ratio if clip_pg_rho is None else np.minimum(clip_pg_rho, ratio)
    c = lambda_ * np.minimum(1.0, ratio)
    vs = np.zeros((T, B))
    adv = np.zeros((T, B))
    unweighted = np.zeros((T, B))
    for b in range(B):
        V = np.append(values[:, b], bootstrap[b])  # V(x_T) = bootstrap
        delta = [rho[t, b] * (rewards[t, b] + discounts[t, b] * V[t + 1] - V[t]) for t in range(T)]
        for s in range(T):
            total = 0.0
            for t in range(s, T):
                prod = 1.0
                for i in range(s, t):
                    prod *= discounts[i, b] * c[i, b]
                total += prod * delta[t]
            vs[s, b] = V[s] + total
        v_next = np.append(vs[1:, b], bootstrap[b])  # v_T = bootstrap
        for s in range(T):
            unweighted[s, b] = rewards[s, b] + discounts[s, b] * v_next[s] - V[s]
            adv[s, b] = pg_rho[s, b] * unweighted[s, b]
    return vs, adv, lp_pi - lp_mu, unweighted


def _case(T, B, A, seed, logit_scale=3.0, end_prob=0.2, dtype=torch.float32):
    """Random batch with wide log-rho spread (clipping active) and episode ends (γ_t = 0)."""
    g = torch.Generator().manual_seed(seed)
    gamma = 0.99
    return {
        "behaviour_logits": logit_scale * torch.randn(T, B, A, generator=g, dtype=dtype),
        "target_logits": logit_scale * torch.randn(T, B, A, generator=g, dtype=dtype),
        "actions": torch.randint(0, A, (T, B), generator=g),
        "discounts": gamma * (torch.rand(T, B, generator=g, dtype=dtype) > end_prob).to(dtype),
        "rewards": torch.randn(T, B, generator=g, dtype=dtype),
        "values": torch.randn(T, B, generator=g, dtype=dtype),
        "bootstrap_value": torch.randn(B, generator=g, dtype=dtype),
    }


def _reference_for(case: dict, clip_rho, clip_pg_rho, lambda_):
    a = {k: v.double().numpy() if v.is_floating_point() else v.numpy() for k, v in case.items()}
    return _reference(
        a["behaviour_logits"], a["target_logits"], a["actions"], a["discounts"], a["rewards"],
        a["values"], a["bootstrap_value"], clip_rho, clip_pg_rho, lambda_,
    )  # fmt: skip


def _close(actual: torch.Tensor, expected: np.ndarray, tol: float) -> None:
    expected_t = torch.from_numpy(expected).to(actual.dtype)
    scale = max(1.0, float(np.abs(expected).max()))
    torch.testing.assert_close(actual, expected_t, rtol=0.0, atol=tol * scale)


@pytest.mark.parametrize("T,B,A", [(1, 1, 2), (5, 3, 4), (20, 6, 6), (40, 2, 3)])
@pytest.mark.parametrize(
    "clip_rho,clip_pg_rho,lambda_",
    [(1.0, 1.0, 1.0), (1.0, 1.0, 0.9), (2.0, 0.5, 0.7), (None, None, 1.0), (0.5, None, 0.95)],
)
def test_matches_paper_definition(T, B, A, clip_rho, clip_pg_rho, lambda_):
    case = _case(T, B, A, seed=1000 * T + 10 * B + A)
    out = from_logits(
        **case, clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho, lambda_=lambda_
    )
    vs, adv, log_rhos, unweighted = _reference_for(case, clip_rho, clip_pg_rho, lambda_)
    if T * B >= 10:  # the case really exercises clipping and episode ends
        assert (log_rhos > math.log(2.0)).any() and (log_rhos < math.log(0.5)).any()
        assert (case["discounts"] == 0).any()
    for name, x in out._asdict().items():
        assert x.shape == (T, B) and x.dtype == torch.float32, name
    _close(out.log_rhos, log_rhos, 1e-5)
    _close(out.vs, vs, 1e-5)
    _close(out.pg_advantages, adv, 1e-5)
    _close(out.advantages, unweighted, 1e-5)  # what the PPO clip's surrogate weighs by π/μ
    torch.testing.assert_close(
        out.log_rhos, out.target_action_log_probs - out.behaviour_action_log_probs
    )


def test_hand_computed_two_steps():
    """T=2, B=1 by hand: ρ = (2, 0.5), γ = (0.9, 0.8), V = (1, 2), bootstrap 3, r = (0.5, -1)."""
    args = (
        torch.tensor([[math.log(2.0)], [math.log(0.5)]], dtype=torch.float64),
        torch.tensor([[0.9], [0.8]], dtype=torch.float64),
        torch.tensor([[0.5], [-1.0]], dtype=torch.float64),
        torch.tensor([[1.0], [2.0]], dtype=torch.float64),
        torch.tensor([3.0], dtype=torch.float64),
    )
    # clipped: ρ = c = (1, 0.5); δ = (1.3, -0.3); v1 = 1.7; v0 = 1 + 1.3 + 0.9·1·(-0.3)
    vs, adv, _ = from_importance_weights(*args, clip_rho_threshold=1.0, clip_pg_rho_threshold=1.0)
    torch.testing.assert_close(vs[:, 0], torch.tensor([2.03, 1.7], dtype=torch.float64))
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.03, -0.3], dtype=torch.float64))
    # unclipped ρ = (2, 0.5) but c stays min(1, π/μ) = (1, 0.5): δ0 = 2.6
    vs, adv, _ = from_importance_weights(*args, clip_rho_threshold=None, clip_pg_rho_threshold=None)
    torch.testing.assert_close(vs[:, 0], torch.tensor([3.33, 1.7], dtype=torch.float64))
    torch.testing.assert_close(adv[:, 0], torch.tensor([2.06, -0.3], dtype=torch.float64))


def test_on_policy_is_n_step_return():
    """μ = π and λ = 1: v_s = Σ_{t≥s} (Π_{i<t} γ_i) r_t + (Π_{i≥s} γ_i) bootstrap, ignoring V."""
    T, B = 15, 4
    case = _case(T, B, 5, seed=7)
    case["target_logits"] = case["behaviour_logits"].clone()
    out = from_logits(**case)
    r, d = case["rewards"].double(), case["discounts"].double()
    expected = torch.empty(T, B, dtype=torch.float64)
    for s in range(T):
        ret, scale = torch.zeros(B, dtype=torch.float64), torch.ones(B, dtype=torch.float64)
        for t in range(s, T):
            ret += scale * r[t]
            scale *= d[t]
        expected[s] = ret + scale * case["bootstrap_value"].double()
    torch.testing.assert_close(out.log_rhos, torch.zeros(T, B))
    torch.testing.assert_close(out.vs, expected.float(), rtol=0.0, atol=1e-5)
    v_next = torch.cat([out.vs[1:], case["bootstrap_value"][None]])
    expected_adv = case["rewards"] + case["discounts"] * v_next - case["values"]
    torch.testing.assert_close(out.pg_advantages, expected_adv)


def test_columns_are_independent():
    """Each trajectory's result is the same whether computed alone or inside the batch."""
    case = _case(12, 5, 4, seed=3)
    full = from_logits(**case, lambda_=0.8)
    for b in range(5):
        alone = {
            k: v[..., b : b + 1, :] if v.dim() == 3 else v[..., b : b + 1] for k, v in case.items()
        }
        col = from_logits(**alone, lambda_=0.8)
        torch.testing.assert_close(col.vs[:, 0], full.vs[:, b])
        torch.testing.assert_close(col.pg_advantages[:, 0], full.pg_advantages[:, b])


def test_results_carry_no_grad():
    case = _case(6, 3, 4, seed=5)
    for k in ("behaviour_logits", "target_logits", "values", "bootstrap_value", "rewards"):
        case[k].requires_grad_(True)
    out = from_logits(**case)
    for name, x in out._asdict().items():
        assert not x.requires_grad and x.grad_fn is None, name
    # the caller's own graph is untouched: grad flows through its own use of the inputs
    case["values"].sum().backward()
    assert case["values"].grad is not None


def test_float64():
    case = _case(10, 3, 4, seed=11, dtype=torch.float64)
    out = from_logits(**case, clip_rho_threshold=1.5, lambda_=0.9)
    vs, adv, _, _ = _reference_for(case, 1.5, 1.0, 0.9)
    assert out.vs.dtype == torch.float64 and out.pg_advantages.dtype == torch.float64
    _close(out.vs, vs, 1e-12)
    _close(out.pg_advantages, adv, 1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    case = _case(20, 8, 6, seed=13)
    cpu = from_logits(**case, lambda_=0.9)
    gpu = from_logits(**{k: v.cuda() for k, v in case.items()}, lambda_=0.9)
    for a, b in zip(cpu, gpu, strict=True):
        assert b.is_cuda
        torch.testing.assert_close(b.cpu(), a, rtol=0.0, atol=1e-5)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda c: c.update(values=c["values"][:-1]), "values must have shape"),
        (lambda c: c.update(bootstrap_value=c["values"]), "bootstrap_value must have shape"),
        (lambda c: c.update(actions=c["actions"].int()), "actions must be int64"),
        (lambda c: c.update(actions=c["actions"][:, :1]), "actions must have shape"),
        (lambda c: c.update(target_logits=c["target_logits"][..., :2]), "same shape"),
        (lambda c: c.update(rewards=c["rewards"].long()), "rewards must be a floating-point"),
        (
            lambda c: c.update(clip_rho_threshold=0.0),
            "clip_rho_threshold must be a positive number or None",
        ),
        (lambda c: c.update(clip_pg_rho_threshold=-1.0), "clip_pg_rho_threshold must be"),
        (lambda c: c.update(lambda_=1.5), r"lambda_ must be in \[0, 1\]"),
    ],
)
def test_bad_input_raises_value_error(change, match):
    case = _case(4, 2, 3, seed=0)
    change(case)
    with pytest.raises(ValueError, match=match):
        from_logits(**case)
