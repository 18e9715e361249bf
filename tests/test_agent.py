"""Torso and ActorCritic: sizes, core inputs, act == unroll, bf16."""

import pytest
import torch
from torch import nn

from agents import ActorCritic, build_agent, make_torso

SMALL_FWP = {"hidden_size": 16, "num_heads": 2, "head_dim": 4, "ff_size": 24}
T, B, A = 6, 3, 5


def test_torso_sizes():
    impala = make_torso("impala", (4, 84, 84))
    assert sum(p.numel() for p in impala.parameters()) == 1_089_232
    assert impala.output_size == 256
    nature = make_torso("nature", (4, 84, 84))
    assert nature.output_size == 512
    obs = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert impala(obs).shape == (2, 256) and nature(obs).shape == (2, 512)
    assert make_torso("mlp", (3, 2))(torch.zeros(5, 3, 2)).shape == (5, 256)


def test_torso_scales_uint8_pixels():
    torso = make_torso("mlp", (3,))
    pixels = torch.tensor([[0, 128, 255]], dtype=torch.uint8)
    torch.testing.assert_close(torso(pixels), torso(pixels.float() / 255))


def test_centered_torso_ignores_each_frames_brightness():
    torch.manual_seed(0)
    torso = make_torso("nature", (4, 84, 84), center=True)
    frames = torch.randint(0, 200, (3, 4, 84, 84), dtype=torch.uint8)
    brighter = frames + torch.tensor([0, 20, 55], dtype=torch.uint8).view(3, 1, 1, 1)
    torch.testing.assert_close(torso(brighter), torso(frames), atol=1e-5, rtol=1e-5)
    plain = make_torso("nature", (4, 84, 84))
    plain.load_state_dict(torso.state_dict())
    assert not torch.allclose(plain(brighter), plain(frames), atol=1e-3)


@pytest.mark.parametrize(
    ("name", "shape", "message"),
    [
        ("resnet", (4, 84, 84), "valid torsos: impala, nature, mlp"),
        ("impala", (84, 84), "needs obs_shape [C, H, W]"),
        ("nature", (4, 0, 84), "obs_shape must be positive ints"),
        ("nature", (4, 20, 20), "too small for torso 'nature'"),
    ],
)
def test_bad_torso(name, shape, message):
    with pytest.raises(ValueError, match="^[^\n]*$") as info:
        make_torso(name, shape)
    assert message in str(info.value)


def rollout(obs_shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randint(0, 256, (T, B, *obs_shape), dtype=torch.uint8, generator=g)
    reward = torch.randn(T, B, generator=g) * 3
    done = torch.zeros(T, B, dtype=torch.bool)
    done[0, 1] = done[2, 0] = done[4, 0] = done[4, 2] = True
    prev_action = torch.randint(0, A, (T, B), generator=g)
    return obs, reward, done, prev_action


@pytest.mark.parametrize(
    ("torso", "obs_shape", "core", "kwargs"),
    [
        ("mlp", (7,), "delta", SMALL_FWP),
        ("mlp", (7,), "delta_rnn", SMALL_FWP),
        ("mlp", (7,), "delta_lstm", SMALL_FWP),
        ("mlp", (7,), "lstm", {"hidden_size": 8}),
        ("impala", (4, 84, 84), "rdn", SMALL_FWP),
    ],
)
def test_act_step_by_step_equals_unroll(torso, obs_shape, core, kwargs):
    torch.manual_seed(0)
    agent = build_agent(torso, core, obs_shape, A, core_kwargs=kwargs, prev_action=True)
    obs, reward, done, prev_action = rollout(obs_shape)
    warm = agent.initial_state(B)
    with torch.no_grad():  # a non-zero state before the unroll
        _, _, warm = agent(obs, reward, torch.zeros_like(done), prev_action, warm)
    logits, value, end = agent.unroll(obs, reward, done, prev_action, warm)
    state = warm
    for t in range(T):
        action, step_logits, step_value, state = agent.act(
            obs[t], reward[t], done[t], prev_action[t], state
        )
        assert action.shape == (B,) and action.dtype == torch.int64
        assert ((action >= 0) & (action < A)).all()
        torch.testing.assert_close(step_logits, logits[t], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(step_value, value[t], rtol=1e-5, atol=1e-5)
    for a, b in zip(state, end, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert logits.shape == (T, B, A) and value.shape == (T, B)
    assert logits.requires_grad and not step_logits.requires_grad


class RecordingCore(nn.Module):
    """y = x, remembering its input, to inspect what the agent feeds the core."""

    def __init__(self, input_size):
        super().__init__()
        self.input_size = self.output_size = input_size

    def initial_state(self, batch_size, device=None):
        return ()

    def forward(self, x, done, state):
        self.seen = x
        return x, state


@pytest.mark.parametrize("prev_action", [False, True])
def test_core_input_is_features_clamped_reward_and_one_hot(prev_action):
    torso = make_torso("mlp", (7,))
    core = RecordingCore(256 + 1 + (A if prev_action else 0))
    agent = ActorCritic(torso, core, A, prev_action=prev_action)
    obs, reward, done, actions = rollout((7,))
    agent(obs, reward, done, actions, ())
    seen = core.seen
    torch.testing.assert_close(seen[..., :256], torso(obs.view(T * B, 7)).view(T, B, 256))
    torch.testing.assert_close(seen[..., 256], reward.clamp(-1, 1))
    assert reward.abs().max() > 1  # the clamp was exercised
    if prev_action:
        assert torch.equal(seen[..., 257:].argmax(-1), actions)
        assert torch.equal(seen[..., 257:].sum(-1), torch.ones(T, B))


def test_greedy_act_takes_argmax():
    agent = build_agent("mlp", "ff", (7,), A)
    obs, reward, done, actions = rollout((7,))
    action, logits, _, state = agent.act(obs[0], reward[0], done[0], actions[0], (), greedy=True)
    assert torch.equal(action, logits.argmax(-1)) and state == ()


def test_mismatched_core_is_rejected():
    torso = make_torso("mlp", (7,))
    with pytest.raises(ValueError, match="core input_size is 300 but torso"):
        ActorCritic(torso, RecordingCore(300), A)
    with pytest.raises(ValueError, match="num_actions must be a positive int"):
        build_agent("mlp", "ff", (7,), 0)


def test_bf16_torso_runs_and_is_close():
    torch.manual_seed(0)
    f32 = build_agent("impala", "lstm", (4, 84, 84), A)
    bf16 = build_agent("impala", "lstm", (4, 84, 84), A, bf16=True)
    bf16.load_state_dict(f32.state_dict())
    obs, reward, done, actions = rollout((4, 84, 84))
    with torch.no_grad():
        logits, value, _ = f32(obs, reward, done, actions, f32.initial_state(B))
        logits16, value16, _ = bf16(obs, reward, done, actions, bf16.initial_state(B))
    assert logits16.dtype == torch.float32
    assert not torch.equal(logits, logits16)  # bf16 really ran
    torch.testing.assert_close(logits16, logits, rtol=0, atol=0.02)
    torch.testing.assert_close(value16, value, rtol=0, atol=0.02)


def test_orthogonal_init_gains_and_a_near_uniform_first_policy():
    torch.manual_seed(0)
    agent = build_agent("nature", "lstm", (4, 84, 84), 6, init="orthogonal")
    default = build_agent("nature", "lstm", (4, 84, 84), 6)
    assert sum(p.numel() for p in agent.parameters()) == sum(
        p.numel() for p in default.parameters()
    )
    for layer, gain in ((agent.torso.fc, 2**0.5), (agent.policy, 0.01), (agent.baseline, 1.0)):
        w = layer.weight.flatten(1)
        rows = min(w.shape)
        gram = w @ w.T if w.shape[0] == rows else w.T @ w
        torch.testing.assert_close(gram, gain**2 * torch.eye(rows), atol=1e-4, rtol=1e-4)
        assert torch.count_nonzero(layer.bias) == 0
    conv = agent.torso.body[0].weight.flatten(1)  # 32 x 256: orthonormal rows times the gain
    torch.testing.assert_close(conv @ conv.T, 2.0 * torch.eye(32), atol=1e-4, rtol=1e-4)
    # the core is left as the core built it
    for (name, a), (_, b) in zip(
        agent.core.named_parameters(), default.core.named_parameters(), strict=True
    ):
        assert a.shape == b.shape, name
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    zeros = torch.zeros(5)
    _, logits, _, _ = agent.act(obs, zeros, zeros.bool(), zeros.long(), agent.initial_state(5))
    assert logits.abs().max() < 0.1


@pytest.mark.parametrize("core", ["rdn", "delta"])
def test_orthogonal_core_init_starts_the_core_as_its_input_projection(core):
    """Under ``orthogonal_core`` the FWP core's output is its (orthogonal) input projection at
    every step, resets or not, and the residual branches get gradients at the first update."""
    torch.manual_seed(0)
    agent = build_agent("mlp", core, (8,), 3, init="orthogonal_core")
    projection = agent.core.input_proj
    w = projection.weight
    torch.testing.assert_close(w @ w.T, torch.eye(w.shape[0]), atol=1e-4, rtol=1e-4)
    T, B = 6, 2
    x = torch.randn(T, B, agent.core.input_size)
    done = torch.zeros(T, B, dtype=torch.bool)
    done[3, 0] = True
    state = tuple(torch.randn_like(s) for s in agent.initial_state(B))
    y, _ = agent.core(x, done, state)
    torch.testing.assert_close(y, projection(x))
    y.square().sum().backward()
    for layer in agent.core.fwps:
        assert layer.out.weight.grad.abs().sum() > 0
    assert all(ff[-1].weight.grad.abs().sum() > 0 for ff in agent.core.ffs)
    # the torso and heads are initialised as under "orthogonal"
    policy = agent.policy.weight
    torch.testing.assert_close(policy @ policy.T, 1e-4 * torch.eye(3), atol=1e-6, rtol=1e-4)


def test_init_choices_agree_with_the_config_and_unknown_is_one_line():
    from agents import INIT_SCHEMES
    from runners.config import INIT_CHOICES

    assert set(INIT_SCHEMES) == set(INIT_CHOICES)
    choices = "orthogonal, orthogonal_core, default"
    with pytest.raises(ValueError, match=f"unknown init 'xavier'; choose one of {choices}"):
        build_agent("nature", "ff", (4, 84, 84), 6, init="xavier")
