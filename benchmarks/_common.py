"""Helpers shared by the benchmark scripts (no environment imports: runs on bare GPU hosts)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from runners.rollout import Batch


def median_seconds(fn: Callable[[], object], seconds: float, warmup: int = 2, sync=None) -> float:
    """Median wall time of `fn` over about `seconds` (at least 3 calls); `sync` before reading."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_batch(
    unroll_length: int,
    batch_size: int,
    obs_shape: Sequence[int],
    num_actions: int,
    initial_state: tuple[torch.Tensor, ...],
    device: torch.device | str = "cpu",
) -> Batch:
    """A learner batch of random observations with rare resets (for timing only)."""
    t1, b = unroll_length + 1, batch_size
    gen = torch.Generator().manual_seed(0)
    batch = Batch(
        obs=torch.randint(0, 255, (t1, b, *obs_shape), dtype=torch.uint8, generator=gen),
        reward=torch.zeros(t1, b),
        done=torch.rand(t1, b, generator=gen) < 0.01,
        action=torch.randint(0, num_actions, (t1, b), generator=gen),
        logits=torch.zeros(t1, b, num_actions),
        initial_state=tuple(s.cpu() for s in initial_state),
        version=torch.zeros(b, dtype=torch.int64),
        episode_end=torch.zeros(t1, b, dtype=torch.bool),
        episode_return=torch.zeros(t1, b),
        episode_length=torch.zeros(t1, b, dtype=torch.int32),
    )
    return batch.to(device)
