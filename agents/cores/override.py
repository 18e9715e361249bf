"""A yes/no that a ``with override.forced(on):`` block imposes on a dispatch decision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class Override:
    """Holds the forced answer (None: decide normally); tests and benchmarks set it to run a
    chosen path, e.g. the torch fast path where the fused kernels would serve."""

    def __init__(self) -> None:
        self.value: bool | None = None

    @contextlib.contextmanager
    def forced(self, on: bool) -> Iterator[None]:
        before, self.value = self.value, on
        try:
            yield
        finally:
            self.value = before
