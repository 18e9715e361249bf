"""Learning curves: reading runs' TensorBoard logs, grouping seeds, the PNG, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import evaluate
from runners.plots import group_runs, read_curve, smooth


def tiny_run(root: Path, name: str, returns: list[float], config: dict | None = None) -> Path:
    """A run folder with `charts/episodic_return` at steps 100, 200, ... (and a config.yaml)."""
    run = root / name
    with SummaryWriter(log_dir=str(run / "tb")) as writer:
        for i, value in enumerate(returns):
            writer.add_scalar("charts/episodic_return", value, (i + 1) * 100)
    if config is not None:
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def test_plot_of_two_runs_is_a_png(tmp_path):
    a = tiny_run(tmp_path, "pong-rdn", [-21, -20, -18, -15, -10])
    b = tiny_run(tmp_path, "pong-lstm", [-21, -21, -20, -19, -19, -18])
    out = tmp_path / "plots" / "curves.png"
    assert evaluate.main(["plot", str(a), str(b), "--out", str(out)]) == 0
    image = Image.open(out)
    assert image.format == "PNG" and image.size == (960, 600)
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    for color in ((31, 119, 180), (255, 127, 14)):  # matplotlib's C0 and C1: one line per run
        assert np.any(np.all(pixels == color, axis=1)), color
    assert sorted(p.name for p in out.parent.iterdir()) == ["curves.png"]


def test_seeds_share_a_group_by_name_or_config(tmp_path):
    cfg = {"env": {"id": "pong"}, "agent": {"core": "rdn"}, "seed": 0, "run": {"dir": "x"}}
    runs = [
        tiny_run(tmp_path, "a-seed1", [1, 2]),
        tiny_run(tmp_path, "a-seed2", [2, 3]),
        tiny_run(tmp_path, "first", [0, 1], cfg),
        tiny_run(tmp_path, "second", [0, 1], {**cfg, "seed": 5, "run": {"dir": "y"}}),
        tiny_run(tmp_path, "other", [0, 1], {**cfg, "agent": {"core": "lstm"}}),
    ]
    groups = group_runs(runs)
    assert groups == {
        "a (2 seeds)": runs[:2],
        "first (2 seeds)": runs[2:4],
        "other": runs[4:],
    }
    out = tmp_path / "seeds.png"
    assert evaluate.main(["plot", *map(str, runs), "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"


def test_read_curve_and_smoothing(tmp_path):
    run = tiny_run(tmp_path, "r", [4.0, 0.0, 2.0])
    steps, returns = read_curve(run)
    assert steps.tolist() == [100, 200, 300] and returns.tolist() == [4.0, 0.0, 2.0]
    # debiased EMA with weight 0.5: 4, (0.5*2 + 0)/0.75, ((0.5*2+0)*0.5 + 1)/0.875
    assert np.allclose(smooth(returns, 0.5), [4.0, 4 / 3, 12 / 7])
    assert np.array_equal(smooth(returns, 0.0), returns)
    with pytest.raises(ValueError, match="smoothing"):
        smooth(returns, 1.0)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "no run folder"),
        ("no_tb", "no TensorBoard logs"),
        ("no_returns", "no charts/episodic_return"),
    ],
)
def test_bad_runs_give_one_line_and_write_nothing(tmp_path, capsys, case, message):
    good = tiny_run(tmp_path, "good", [1, 2])
    bad = tmp_path / case
    if case == "no_tb":
        bad.mkdir()
    elif case == "no_returns":
        with SummaryWriter(log_dir=str(bad / "tb")) as writer:
            writer.add_scalar("charts/SPS", 1.0, 1)
    out = tmp_path / "out.png"
    assert evaluate.main(["plot", str(good), str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(bad) in err
    assert not out.exists()


def test_bad_smoothing_is_a_usage_error(tmp_path, capsys):
    run = tiny_run(tmp_path, "r", [1])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["plot", str(run), "--smooth", "1.5"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1
