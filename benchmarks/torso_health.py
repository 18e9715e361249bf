"""Is a trained Atari agent still looking at the screen? Prints one JSON object.

For a checkpoint: the fraction of each torso layer's units that are active on real frames of
its game (random play), how much the torso features, core output, logits and value vary across
those frames relative to their size, and conv1's mean weight and bias (a drift of the mean
weight, times the grey background in every pixel, can switch every filter off). For Pong it
also plays one game with the policy and correlates (ball y − paddle y) with P(up) − P(down),
from the emulator's RAM: the sign says whether the policy follows the ball, the spread how much.

    python benchmarks/torso_health.py runs/<run>/checkpoints/ckpt_<steps>.pt
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envs.atari import AtariVectorEnv  # noqa: E402
from envs.atari_single import make_atari_env  # noqa: E402
from runners.checkpoint import load_checkpoint  # noqa: E402
from runners.config import from_dict  # noqa: E402
from runners.factory import make_agent, probe_env  # noqa: E402

PONG_BALL_Y, PONG_PLAYER_Y = 54, 51  # RAM addresses
PONG_UP, PONG_DOWN = (2, 4), (3, 5)  # RIGHT/RIGHTFIRE move up, LEFT/LEFTFIRE down


def sample_frames(game: str, count: int = 160, seed: int = 3) -> torch.Tensor:
    """``count`` observations from 16 envs under random play, 20 steps apart."""
    env = AtariVectorEnv(game, 16, seed=seed)
    env.reset()
    rng = np.random.default_rng(seed)
    frames = []
    for step in range(20 * count // 16):
        out = env.step(rng.integers(0, env.num_actions, 16))
        if step % 20 == 19:
            frames.append(out.obs.copy())
    env.close()
    return torch.from_numpy(np.concatenate(frames))


def relative_spread(x: torch.Tensor) -> dict[str, float]:
    """Mean |x| and the per-unit std across frames, alone and relative to the mean |x|."""
    flat = x.reshape(x.shape[0], -1).float()
    size, spread = float(flat.abs().mean()), float(flat.std(0).mean())
    return {"mean_abs": size, "std_across_frames": spread, "relative": spread / (size + 1e-12)}


@torch.no_grad()
def torso_layers(agent: torch.nn.Module, frames: torch.Tensor) -> list[dict[str, float]]:
    torso = agent.torso
    x = frames.float() / 255.0
    if getattr(torso, "center", False):
        x = x - x.mean(dim=(-2, -1), keepdim=True)
    layers = []
    for layer in torso.body:
        x = layer(x)
        if isinstance(layer, torch.nn.ReLU):
            layers.append({"active_fraction": float((x > 0).float().mean()), **relative_spread(x)})
    return layers


@torch.no_grad()
def heads(agent: torch.nn.Module, frames: torch.Tensor) -> dict[str, dict[str, float]]:
    n = frames.shape[0]
    captured = {}

    def keep_core_output(module, inputs, outputs) -> None:
        captured["core"] = outputs[0][0]  # y of the single step: [B, hidden]

    hook = agent.core.register_forward_hook(keep_core_output)
    zeros = torch.zeros(n)
    _, logits, value, _ = agent.act(
        frames, zeros, zeros.bool(), zeros.long(), agent.initial_state(n)
    )
    hook.remove()
    return {
        "torso": relative_spread(agent.torso(frames)),
        "core": relative_spread(captured["core"]),
        "logits": relative_spread(logits),
        "value": relative_spread(value),
    }


@torch.no_grad()
def pong_ball_following(agent: torch.nn.Module, seed: int = 1) -> dict[str, float]:
    """One game: corr(ball y − paddle y, P(up) − P(down)) and the spread of that preference."""
    env = make_atari_env("pong", seed)
    obs, _ = env.reset(seed=seed)
    state = agent.initial_state(1)
    reward, done, action = torch.zeros(1), torch.zeros(1, dtype=torch.bool), torch.zeros(1).long()
    gaps, prefs, total = [], [], 0.0
    while True:
        action, logits, _, state = agent.act(
            torch.from_numpy(obs)[None], reward, done, action, state
        )
        p = torch.softmax(logits[0], -1)
        ram = env.unwrapped.ale.getRAM()
        gaps.append(int(ram[PONG_BALL_Y]) - int(ram[PONG_PLAYER_Y]))
        prefs.append(float(p[list(PONG_UP)].sum() - p[list(PONG_DOWN)].sum()))
        obs, r, terminated, truncated, _ = env.step(int(action))
        total += r
        reward, done = torch.tensor([float(r)]), torch.tensor([terminated or truncated])
        if terminated or truncated:
            break
    env.close()
    gap, pref = np.array(gaps), np.array(prefs)
    on_screen = np.abs(gap) < 100  # RAM holds a far-off y while the ball is out of play
    return {
        "return": total,
        "corr_gap_vs_up_minus_down": float(np.corrcoef(gap[on_screen], pref[on_screen])[0, 1]),
        "up_minus_down_std": float(pref.std()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    saved = load_checkpoint(args.checkpoint)
    cfg = from_dict(saved["config"])
    agent = make_agent(cfg, probe_env(cfg))
    agent.load_state_dict(saved["agent"])
    agent.eval()
    frames = sample_frames(cfg.env.id)
    conv1 = agent.torso.body[0]
    report = {
        "checkpoint": str(args.checkpoint),
        "steps": saved["steps"],
        "layers": torso_layers(agent, frames),
        "conv1_weight_mean": float(conv1.weight.mean()),
        "conv1_bias_mean": float(conv1.bias.mean()),
        **heads(agent, frames),
    }
    if saved["game"].lower() == "pong":
        report["pong"] = pong_ball_following(agent)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
