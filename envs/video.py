"""Gameplay video: a streaming mp4 writer, the overlay side panel and GIF encoding.

Frames go straight to ffmpeg through moviepy's ``FFMPEG_VideoWriter`` instead of being held in
memory for an ``ImageSequenceClip``: a 108k-frame Atari game is 27k agent steps, several GB of
upscaled frames. The file appears under its final name only when complete (temp + rename).

The side panel is drawn with Pillow (a dependency of moviepy and matplotlib), about a
millisecond per frame: score, step, value estimate, one bar per action probability (the chosen
action highlighted) and a grid of heat maps, e.g. each head's fast-weight matrix per layer.
This module knows nothing about agents: callers pass plain numbers and arrays.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VIDEO_HEIGHT = 420  # frames are upscaled by an integer factor to at least this many rows
_BACKGROUND = (24, 24, 28)
_TEXT = (230, 230, 230)
_DIM = (150, 150, 160)
_BAR = (90, 120, 170)
_CHOSEN = (240, 150, 40)
# Diverging colour map for heat maps: blue (negative) - near white (0) - red (positive).
_NEGATIVE = np.array([59, 76, 192], dtype=np.float32)
_ZERO = np.array([242, 242, 242], dtype=np.float32)
_POSITIVE = np.array([180, 4, 38], dtype=np.float32)


def upscale_factor(height: int, target: int = VIDEO_HEIGHT) -> int:
    """Smallest integer factor that makes ``height`` rows at least ``target`` (at least 1)."""
    return max(1, math.ceil(target / height))


def upscale(frame: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour upscale of an [H, W, 3] uint8 frame by an integer ``factor``."""
    if factor == 1:
        return frame
    return frame.repeat(factor, axis=0).repeat(factor, axis=1)


def _even(frame: np.ndarray) -> np.ndarray:
    """Pad to even height and width (libx264's yuv420p needs them) with the background colour."""
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    out = np.empty((h + h % 2, w + w % 2, 3), dtype=np.uint8)
    out[:] = _BACKGROUND
    out[:h, :w] = frame
    return out


class Mp4Writer:
    """Stream RGB frames into an H.264 mp4 at ``fps``; ``close()`` publishes the file atomically.

    Every frame must have the first frame's size (odd sizes are padded by one pixel). Used as a
    context manager, an exception discards the partial file.
    """

    def __init__(self, path: Path, fps: float, preset: str = "veryfast") -> None:
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps!r}")
        self.path = Path(path)
        self.fps = fps
        self.preset = preset
        self.frames = 0
        self.size: tuple[int, int] | None = None  # (width, height) as written
        self._tmp = self.path.with_name(f".{self.path.stem}.tmp{os.getpid()}{self.path.suffix}")
        self._writer = None  # moviepy's FFMPEG_VideoWriter, opened on the first frame

    def write(self, frame: np.ndarray) -> None:
        """Append one [H, W, 3] uint8 frame."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"frames must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
        frame = _even(frame)
        size = (frame.shape[1], frame.shape[0])
        if self._writer is None:
            # moviepy takes ~0.15 s to import: only processes that record pay for it.
            from moviepy.video.io.ffmpeg_writer import FFMPEG_VideoWriter

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.size = size
            self._writer = FFMPEG_VideoWriter(
                str(self._tmp), size, self.fps, codec="libx264", preset=self.preset
            )
        elif size != self.size:
            raise ValueError(f"frame size {size} differs from the first frame's {self.size}")
        self._writer.write_frame(np.ascontiguousarray(frame))
        self.frames += 1

    def close(self) -> Path:
        """Finish encoding and rename the temp file to ``path``."""
        if self._writer is None:
            raise ValueError(f"no frames were written to {self.path}")
        self._writer.close()
        self._writer = None
        if not self._tmp.is_file() or self._tmp.stat().st_size == 0:
            raise OSError(f"ffmpeg wrote no video to {self._tmp}")
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Stop ffmpeg and delete the partial file."""
        if self._writer is not None:
            with contextlib.suppress(OSError):
                self._writer.close()
            self._writer = None
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class PanelInfo:
    """What the side panel shows for one frame."""

    score: float
    step: int
    probs: np.ndarray | None = None  # [A] action probabilities of the decision at this frame
    action: int | None = None  # the action taken
    value: float | None = None  # value estimate
    action_names: list[str] | None = None
    heatmaps: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (label, 2-D array)
    heatmap_columns: int = 1  # heat maps per grid row (e.g. heads; one row per layer)
    heatmap_title: str = "fast weights"


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def heat_colors(matrix: np.ndarray) -> np.ndarray:
    """[r, c] values -> [r, c, 3] uint8 colours, symmetric around 0, scaled by the max |value|."""
    values = np.asarray(matrix, dtype=np.float32)
    scale = float(np.abs(values).max()) if values.size else 0.0
    x = values / scale if scale > 0 else np.zeros_like(values)
    x = np.clip(x, -1.0, 1.0)[..., None]
    rgb = np.where(x < 0, _ZERO + (_NEGATIVE - _ZERO) * -x, _ZERO + (_POSITIVE - _ZERO) * x)
    return np.rint(rgb).astype(np.uint8)


def _resize_nearest(image: np.ndarray, height: int, width: int) -> np.ndarray:
    rows = np.arange(height) * image.shape[0] // height
    cols = np.arange(width) * image.shape[1] // width
    return image[rows[:, None], cols[None, :]]


def render_panel(info: PanelInfo, height: int, width: int) -> np.ndarray:
    """Draw the side panel as an [height, width, 3] uint8 image."""
    image = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = _font(12)
    pad, line = 6, 15
    lines = [f"score {info.score:g}", f"step {info.step}"]
    if info.value is not None:
        lines.append(f"value {info.value:+.3f}")
    for i, text in enumerate(lines):
        draw.text((pad, pad + i * line), text, fill=_TEXT, font=font)
    y = pad + len(lines) * line + pad
    if info.probs is not None:
        y = _draw_bars(draw, info, y, height, width, font)
    if info.heatmaps:
        _draw_heatmaps(image, draw, info, y + pad, height, width, font)
    return np.asarray(image)


def _draw_bars(draw, info: PanelInfo, top: int, height: int, width: int, font) -> int:
    """One horizontal bar per action; returns the y below the bars."""
    probs = np.asarray(info.probs, dtype=np.float64)
    count = len(probs)
    share = 0.45 if info.heatmaps else 1.0
    room = int((height - top) * share) - 6
    row = max(3, min(14, room // max(count, 1)))
    names = info.action_names or [str(a) for a in range(count)]
    label_w, number_w, pad = 78, 38, 6
    x0, x1 = pad + label_w, width - pad - number_w
    for a, p in enumerate(probs):
        y = top + a * row
        if y + row > height:
            break
        color = _CHOSEN if a == info.action else _BAR
        if row >= 10:
            draw.text((pad, y), names[a][:11], fill=_TEXT, font=font)
            draw.text((x1 + 4, y), f"{p:.2f}", fill=_DIM, font=font)
        bar = int(round((x1 - x0) * min(max(p, 0.0), 1.0)))
        draw.rectangle((x0, y + 1, x0 + max(bar, 1) - 1, y + row - 2), fill=color)
    return top + count * row


def _draw_heatmaps(image: Image.Image, draw, info: PanelInfo, top, height, width, font) -> None:
    """A grid of heat maps, ``heatmap_columns`` per row, each with its label above it."""
    pad, gap, label_h = 6, 4, 13
    draw.text((pad, top), info.heatmap_title, fill=_TEXT, font=font)
    top += label_h + 2
    cols = max(1, info.heatmap_columns)
    rows = math.ceil(len(info.heatmaps) / cols)
    cell_w = (width - 2 * pad - (cols - 1) * gap) // cols
    cell_h = (height - top - pad - rows * label_h - (rows - 1) * gap) // rows
    if cell_w < 8 or cell_h < 8:
        return
    for i, (label, matrix) in enumerate(info.heatmaps):
        r, c = divmod(i, cols)
        mat = np.atleast_2d(np.asarray(matrix))
        scale = min(cell_w / mat.shape[1], cell_h / mat.shape[0])
        h, w = max(1, int(mat.shape[0] * scale)), max(1, int(mat.shape[1] * scale))
        x = pad + c * (cell_w + gap)
        y = top + r * (cell_h + label_h + gap)
        draw.text((x, y), label, fill=_DIM, font=font)
        tile = _resize_nearest(heat_colors(mat), h, w)
        image.paste(Image.fromarray(tile), (x, y + label_h))


def side_by_side(frame: np.ndarray, panel: np.ndarray) -> np.ndarray:
    """The frame with the panel on its right (the panel must have the frame's height)."""
    if frame.shape[0] != panel.shape[0]:
        raise ValueError(f"panel height {panel.shape[0]} != frame height {frame.shape[0]}")
    return np.concatenate([frame, panel], axis=1)


class FrameSampler:
    """Keeps at most ``limit`` evenly spaced frames of a stream of unknown length (for GIFs).

    When full, every other kept frame is dropped and the stride doubles.
    """

    def __init__(self, limit: int = 200) -> None:
        if limit < 2:
            raise ValueError(f"limit must be >= 2, got {limit!r}")
        self.limit = limit
        self.stride = 1
        self.frames: list[np.ndarray] = []
        self._seen = 0

    def add(self, frame: np.ndarray) -> None:
        if self._seen % self.stride == 0:
            self.frames.append(frame)
            if len(self.frames) > self.limit:
                self.frames = self.frames[::2]
                self.stride *= 2
        self._seen += 1


def encode_gif(frames: list[np.ndarray], fps: float) -> bytes:
    """An endlessly looping animated GIF of [H, W, 3] uint8 frames."""
    if not frames:
        raise ValueError("a GIF needs at least one frame")
    images = [Image.fromarray(f) for f in frames]
    buffer = io.BytesIO()
    duration = max(20, int(round(1000 / fps)))  # browsers clamp shorter delays
    images[0].save(
        buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0
    )
    return buffer.getvalue()
