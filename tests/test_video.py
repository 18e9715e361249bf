"""envs/video.py: mp4 files read back frame by frame, the overlay panel, GIF encoding."""

from __future__ import annotations

import io

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from envs.video import (
    FrameSampler,
    Mp4Writer,
    PanelInfo,
    encode_gif,
    heat_colors,
    render_panel,
    side_by_side,
    upscale,
    upscale_factor,
)


def read_mp4(path) -> tuple[tuple[int, int], float, list[np.ndarray]]:
    """(width, height), fps and every decoded RGB frame of an mp4."""
    frames = imageio_ffmpeg.read_frames(str(path))
    meta = next(frames)
    width, height = meta["size"]
    decoded = [np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in frames]
    return (width, height), meta["fps"], decoded


def test_mp4_has_every_frame_at_its_size_and_fps(tmp_path):
    path = tmp_path / "videos" / "clip.mp4"
    levels = [0, 80, 160, 240, 40, 200, 120]
    with Mp4Writer(path, fps=15) as writer:
        for level in levels:
            writer.write(np.full((42, 32, 3), level, dtype=np.uint8))
    assert writer.frames == len(levels)
    size, fps, frames = read_mp4(path)
    assert size == (32, 42) and fps == 15.0
    assert len(frames) == len(levels)
    # flat grey frames survive H.264 almost exactly: the order of frames is kept
    assert [round(float(f.mean()) / 40) * 40 for f in frames] == levels
    assert sorted(p.name for p in path.parent.iterdir()) == ["clip.mp4"]  # no temp file left


def test_odd_sizes_are_padded_to_even(tmp_path):
    path = tmp_path / "odd.mp4"
    with Mp4Writer(path, fps=10) as writer:
        for _ in range(3):
            writer.write(np.zeros((21, 15, 3), dtype=np.uint8))
    size, _, frames = read_mp4(path)
    assert size == (16, 22) and len(frames) == 3


def test_failed_recording_leaves_no_file(tmp_path):
    path = tmp_path / "bad.mp4"
    with pytest.raises(ValueError, match="differs"), Mp4Writer(path, fps=10) as writer:
        writer.write(np.zeros((20, 20, 3), dtype=np.uint8))
        writer.write(np.zeros((22, 20, 3), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_frames_and_fps(tmp_path):
    with pytest.raises(ValueError, match="fps"):
        Mp4Writer(tmp_path / "x.mp4", fps=0)
    writer = Mp4Writer(tmp_path / "x.mp4", fps=10)
    with pytest.raises(ValueError, match="uint8"):
        writer.write(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="no frames"):
        writer.close()


def test_upscale_is_nearest_neighbour():
    frame = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    big = upscale(frame, 3)
    assert big.shape == (6, 9, 3)
    assert np.array_equal(big[::3, ::3], frame) and np.array_equal(big[2, 8], frame[0, 2])
    assert upscale_factor(210) == 2 and upscale_factor(12) == 35 and upscale_factor(1000) == 1


def test_panel_draws_bars_and_heatmaps():
    probs = np.array([0.1, 0.6, 0.3])
    maps = [(f"L1 h{h}", np.random.default_rng(h).normal(size=(8, 8))) for h in range(4)]
    info = PanelInfo(
        score=3, step=7, probs=probs, action=1, value=0.25, heatmaps=maps, heatmap_columns=2
    )
    panel = render_panel(info, 420, 320)
    assert panel.shape == (420, 320, 3) and panel.dtype == np.uint8
    orange = np.all(panel == (240, 150, 40), axis=-1)  # the chosen action's bar
    blue = np.all(panel == (90, 120, 170), axis=-1)
    assert orange.sum() > 0 and blue.sum() > 0
    bare = render_panel(PanelInfo(score=0, step=0), 420, 320)
    assert not np.all(bare == (90, 120, 170), axis=-1).any()
    combined = side_by_side(np.zeros((420, 320, 3), np.uint8), panel)
    assert combined.shape == (420, 640, 3)
    with pytest.raises(ValueError, match="height"):
        side_by_side(np.zeros((400, 320, 3), np.uint8), panel)


def test_heat_colors_are_symmetric_around_zero():
    colors = heat_colors(np.array([[-2.0, 0.0, 2.0, 1.0]]))
    assert tuple(colors[0, 0]) == (59, 76, 192)  # most negative: blue
    assert tuple(colors[0, 1]) == (242, 242, 242)  # zero: near white
    assert tuple(colors[0, 2]) == (180, 4, 38)  # most positive: red
    assert colors[0, 3, 0] == 211  # halfway between white and red
    assert np.all(heat_colors(np.zeros((2, 2))) == 242)


def test_frame_sampler_keeps_evenly_spaced_frames():
    sampler = FrameSampler(limit=4)
    for i in range(10):
        sampler.add(np.full((1, 1, 3), i, np.uint8))
    assert [int(f[0, 0, 0]) for f in sampler.frames] == [0, 4, 8]
    assert sampler.stride == 4


def test_gif_is_animated_with_every_frame():
    frames = [np.full((10, 12, 3), 50 * i, np.uint8) for i in range(4)]
    gif = Image.open(io.BytesIO(encode_gif(frames, fps=10)))
    assert gif.format == "GIF" and gif.size == (12, 10) and gif.n_frames == 4
    assert gif.info["duration"] == 100
