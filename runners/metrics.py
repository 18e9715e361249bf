"""Training metrics: TensorBoard scalars, a console progress line and the run's train.log.

Metric names follow DESIGN §6 (``charts/episodic_return``, ``losses/total``, ``perf/...``).
Nothing here records environment variables: only the values passed in are written.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TextIO

import torch

EPISODIC_RETURN = "charts/episodic_return"
EPISODIC_LENGTH = "charts/episodic_length"
SPS = "charts/SPS"
LEARNING_RATE = "charts/learning_rate"

_RUN_HANDLER_FLAG = "_deltabeast_run_handler"
_log = logging.getLogger(__name__)
_root_level_before: list[int] = []  # the root level to restore in close_run_logging


class MetricsLogger:
    """Scalars to TensorBoard event files under ``<run_dir>/tb/``.

    ``purge_step``: on resume, the step of the loaded checkpoint, so TensorBoard drops the
    events an earlier session wrote beyond it. ``use_tensorboard=False`` makes every call a
    no-op (for tests and dry runs) without changing the caller.
    """

    def __init__(
        self,
        run_dir: Path,
        use_tensorboard: bool = True,
        purge_step: int | None = None,
        flush_secs: int = 30,
    ):
        self.log_dir = Path(run_dir) / "tb"
        self._writer = None
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(
                log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs
            )

    def scalar(self, name: str, value: float, step: int) -> None:
        """Record one scalar (a float, int or 0-d tensor) at ``step``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric name must be a non-empty string, got {name!r}")
        if self._writer is not None:
            self._guarded(self._writer.add_scalar, name, float(value), global_step=int(step))

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Record several scalars at the same ``step``."""
        for name, value in values.items():
            self.scalar(name, value, step)

    def flush(self) -> None:
        """Push buffered events to disk."""
        if self._writer is not None:
            self._guarded(self._writer.flush)

    def close(self) -> None:
        """Flush and release the event file; later calls are no-ops."""
        if self._writer is not None:
            self._guarded(self._writer.close)
            self._writer = None

    def _guarded(self, call: Callable, *args, **kwargs) -> None:
        """Run a writer call; if the disk fails (full, read-only), turn TensorBoard off for the
        rest of the run with one error line instead of stopping training."""
        try:
            call(*args, **kwargs)
        except OSError as err:
            writer, self._writer = self._writer, None
            _log.error(
                "TensorBoard summaries off for the rest of this run: cannot write %s: %s",
                self.log_dir,
                err.strerror or err,
            )
            with contextlib.suppress(OSError):
                writer.close()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IntervalPeaks:
    """The largest value of some update metrics over every update since the last summary.

    Summaries record one update every ``logging.every_s``, about one in twenty on the fast
    preset, so a single update that jumps far from the actors' policy is usually not among
    them; its peak is. Metrics are chosen by name prefix (``grad_norm/`` covers every part of
    the agent). Values stay tensors until ``drain`` so a GPU learner does not sync.
    """

    PREFIXES = ("policy/kl_from_behaviour", "losses/grad_norm", "grad_norm/", "perf/policy_lag")

    def __init__(self, prefixes: Iterable[str] = PREFIXES) -> None:
        self.prefixes = tuple(prefixes)
        self._peaks: dict[str, torch.Tensor] = {}

    def add(self, stats: Mapping[str, torch.Tensor]) -> None:
        """Fold one update's metrics in: those whose names start with one of the prefixes."""
        for name, value in stats.items():
            if name.startswith(self.prefixes):
                value = value.detach()
                peak = self._peaks.get(name)
                self._peaks[name] = value if peak is None else torch.maximum(peak, value)

    def drain(self) -> dict[str, float]:
        """``{name}_max`` for every metric seen since the last drain, then start afresh."""
        out = {f"{name}_max": float(value) for name, value in self._peaks.items()}
        self._peaks.clear()
        return out


class ProgressLine:
    """A console status line: steps/total, SPS, mean return of recent games, elapsed, ETA.

    On a terminal one line is redrawn in place (``\\r``) at most every ``interval_s`` (default
    0.5 s); otherwise (a log file, CI) a plain line is printed every ``interval_s`` (default
    30 s). SPS is measured over roughly the last ``sps_window_s`` seconds so it follows the
    current speed; the ETA extrapolates it.
    """

    def __init__(
        self,
        total_steps: int,
        start_step: int = 0,
        stream: TextIO | None = None,
        interval_s: float | None = None,
        tty: bool | None = None,
        episodes: int = 100,
        sps_window_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.total_steps = total_steps
        self.stream = stream if stream is not None else sys.stdout
        self.tty = tty if tty is not None else _isatty(self.stream)
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.tty else 30.0)
        self.sps_window_s = sps_window_s
        self._clock = clock
        self._returns: collections.deque[float] = collections.deque(maxlen=episodes)
        self._start = clock()
        self._marks: collections.deque[tuple[float, int]] = collections.deque()
        self._marks.append((self._start, start_step))
        self._last_print: float | None = None
        self._drawn = False

    def add_returns(self, returns: Iterable[float]) -> None:
        """Record the returns of games that just finished."""
        self._returns.extend(float(r) for r in returns)

    def update(self, step: int, force: bool = False) -> bool:
        """Show the line for ``step`` if ``interval_s`` has passed (or ``force``); True if shown."""
        now = self._clock()
        if not force and self._last_print is not None and now - self._last_print < self.interval_s:
            return False
        line = self.format(step, now)
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._last_print = now
        self._marks.append((now, step))
        return True

    def close(self, step: int | None = None) -> None:
        """Show a final line for ``step`` (if given) and end the redrawn line."""
        if step is not None:
            self.update(step, force=True)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False

    def sps(self, step: int, now: float) -> float | None:
        """Steps per second over the recent window; None before any time has passed."""
        while len(self._marks) > 1 and now - self._marks[1][0] >= self.sps_window_s:
            self._marks.popleft()
        then, then_step = self._marks[0]
        return (step - then_step) / (now - then) if now > then else None

    def format(self, step: int, now: float | None = None) -> str:
        """The status text for ``step`` at clock time ``now`` (default: the clock's now)."""
        now = self._clock() if now is None else now
        rate = self.sps(step, now)
        left = max(self.total_steps - step, 0)
        if left == 0:
            eta = "0:00:00"
        elif rate and rate > 0:
            eta = format_duration(left / rate)
        else:
            eta = "--:--:--"
        if self._returns:
            mean = math.fsum(self._returns) / len(self._returns)
            ret = f"return {mean:.2f} (last {len(self._returns)})"
        else:
            ret = "return n/a"
        sps_text = f"{rate:,.0f} SPS" if rate is not None else "-- SPS"
        return (
            f"{format_count(step)}/{format_count(self.total_steps)} steps "
            f"({100.0 * step / self.total_steps:.1f}%) | {sps_text} | {ret} | "
            f"elapsed {format_duration(now - self._start)} | ETA {eta}"
        )


def format_count(n: int) -> str:
    """999 -> '999', 12_345 -> '12.35k', 50_000_000 -> '50.00M'."""
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_duration(seconds: float) -> str:
    """Whole seconds as H:MM:SS, with a day count past 24 h: 93784 -> '1d 2:03:04'."""
    total = int(max(seconds, 0.0))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


def setup_run_logging(
    run_dir: Path, level: int = logging.INFO, console: bool = True
) -> logging.Logger:
    """Send log records to ``<run_dir>/train.log`` (appended) and to stderr.

    Installs handlers on the root logger so that every module's ``logging.getLogger(__name__)``
    lands in the run's log; calling it again replaces the handlers it installed before.
    Returns the ``deltabeast`` logger for the trainer's own messages.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    close_run_logging()
    root = logging.getLogger()
    file_handler = logging.FileHandler(run_dir / "train.log", mode="a", encoding="utf-8")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handlers: list[logging.Handler] = [file_handler]
    if console:
        stream_handler = _ConsoleHandler(sys.stderr)
        stream_handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s: %(message)s", datefmt="%H:%M:%S")
        )
        handlers.append(stream_handler)
    for handler in handlers:
        setattr(handler, _RUN_HANDLER_FLAG, True)
        root.addHandler(handler)
    _root_level_before.append(root.level)
    root.setLevel(level)
    return logging.getLogger("deltabeast")


def close_run_logging() -> None:
    """Remove and close the handlers installed by :func:`setup_run_logging`; restore the level."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _RUN_HANDLER_FLAG, False):
            root.removeHandler(handler)
            handler.close()
    if _root_level_before:
        root.setLevel(_root_level_before[0])
        _root_level_before.clear()


class _ConsoleHandler(logging.StreamHandler):
    """On a terminal, clear a redrawn progress line before printing a log record over it."""

    def emit(self, record: logging.LogRecord) -> None:
        if _isatty(self.stream):
            self.stream.write("\r\x1b[K")
        super().emit(record)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
