"""benchmarks/core_speed.py's floor: the FWP block without its recurrence is exactly the dense
work of the block, and the real layer comes back afterwards."""

from __future__ import annotations

import torch

from agents.cores import make_core
from agents.cores.fwp import FastWeightLayer
from benchmarks.core_speed import recurrence_removed


def test_the_floor_runs_every_dense_layer_and_only_skips_the_recurrence() -> None:
    torch.manual_seed(0)
    sizes = dict(hidden_size=8, num_layers=1, num_heads=2, head_dim=4, ff_size=16)
    core = make_core("delta_lstm", 5, **sizes)
    x = torch.randn(6, 3, 5)
    done = torch.zeros(6, 3, dtype=torch.bool)
    state = core.initial_state(3)
    original = FastWeightLayer.forward
    with recurrence_removed():
        y, kept = core(x, done, state)
        y.sum().backward()
    assert FastWeightLayer.forward is original
    assert all(p.grad is not None for p in core.parameters())  # the whole projection is in
    assert all(a is b for a, b in zip(kept, state, strict=True))

    layer = core.fwps[0]
    with torch.no_grad():
        h = core.input_proj(x)
        h = h + layer.out(layer.slow(core.norms1[0](h))[..., :8])
        expected = h + core.ffs[0](core.norms2[0](h))
        torch.testing.assert_close(y, expected)
        real, _ = core(x, done, state)
    assert not torch.allclose(real, expected)  # outside the context the recurrence is back
