"""The non-FWP cores: the paper's LSTM baseline and a feed-forward (no memory) core."""

from __future__ import annotations

import torch
from torch import nn

State = tuple[torch.Tensor, ...]


class FFCore(nn.Module):
    """No recurrence: ``y = x`` and an empty state, so a memoryless agent fits the same API."""

    def __init__(self, input_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = input_size

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return ()

    def forward(
        self, x: torch.Tensor, done: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        return x, state


class LSTMCore(nn.Module):
    """One ``nn.LSTM`` layer with the reset rule of DESIGN §2; state ``(h, c)``, each ``[B, H]``.

    The sequence is cut at every time step where some episode starts, and each segment runs as
    one ``nn.LSTM`` call (its fused kernel) with the state zeroed at the rows that start there;
    an unroll without resets is one call.
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = hidden_size
        self.lstm = nn.LSTM(input_size, hidden_size)

    def initial_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        shape = (batch_size, self.output_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(
        self, x: torch.Tensor, done: torch.Tensor, state: State
    ) -> tuple[torch.Tensor, State]:
        h, c = state
        starts = done.any(dim=1).nonzero().flatten().tolist()
        bounds = sorted({0, *starts}) + [x.shape[0]]
        outputs = []
        for t0, t1 in zip(bounds[:-1], bounds[1:], strict=True):
            keep = (~done[t0]).to(x.dtype).unsqueeze(-1)
            y, (h1, c1) = self.lstm(x[t0:t1], ((h * keep).unsqueeze(0), (c * keep).unsqueeze(0)))
            h, c = h1.squeeze(0), c1.squeeze(0)
            outputs.append(y)
        y = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return y, (h, c)
