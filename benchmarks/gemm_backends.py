"""float32 GEMM speed of torch's two CPU routes at the learner's shapes; one JSON object each.

torch's CPU `mm`/`nn.Linear` call MKL, whose sgemm takes a slower code path on AMD CPUs than on
Intel ones, while convolutions and `nn.LSTM` go through oneDNN, which does not. This prints, per
shape and thread count, the ms and GFLOP/s of `x @ w.T` (MKL) and of oneDNN's linear on the
same dense tensors (`torch.ops.mkldnn._linear_pointwise`), and their largest difference; then
one `agents.linear.Linear` layer's forward and backward through each route (the products its
route choice weighs), and the route it picks by itself at that thread count.

    python benchmarks/gemm_backends.py [--threads 1,2] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents import linear  # noqa: E402
from benchmarks.core_speed import alternating_medians, median_ms  # noqa: E402

# (rows, in, out): T*B = 1600 rows of the paper's unroll (T=50, B=32)
SHAPES = {
    "fwp input_proj 257->128": (1600, 257, 128),
    "lt/delta slow 128->384": (1600, 128, 384),
    "delta_lstm slow 128->1944": (1600, 128, 1944),
    "ff 128->512": (1600, 128, 512),
    "nn.LSTM input 257->1024": (1600, 257, 1024),
    "weight grad 1600 rows, 128x384": (384, 1600, 128),
    "nature fc 3136->512": (1600, 3136, 512),
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def layer_step(x: torch.Tensor, fan_out: int, onednn: bool) -> Callable[[], None]:
    """One fwd+bwd of a ``Linear(x's width, fan_out)`` on one route, x asking for a gradient."""
    layer = linear.Linear(x.shape[1], fan_out)
    x = x.detach().requires_grad_()

    def step() -> None:
        with linear.forced(onednn):
            layer(x).sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    onednn = torch.ops.mkldnn._linear_pointwise
    cpu = cpu_name()
    for n in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(n)
        for name, (rows, k, out) in SHAPES.items():
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(rows, k, generator=g), torch.randn(out, k, generator=g)
            flop = 2 * rows * k * out
            mkl_ms = median_ms(lambda x=x, w=w: x @ w.t(), args.repeats)
            dnn_ms = median_ms(lambda x=x, w=w: onednn(x, w, None, "none", [], ""), args.repeats)
            diff = (onednn(x, w, None, "none", [], "") - x @ w.t()).abs().max().item()
            layer_mkl, layer_dnn = alternating_medians(
                [layer_step(x, out, False), layer_step(x, out, True)], args.repeats
            )
            record = {
                "shape": name,
                "threads": n,
                "cpu": cpu,
                "mkl_ms": round(mkl_ms, 3),
                "onednn_ms": round(dnn_ms, 3),
                "mkl_gflops": round(flop / mkl_ms / 1e6),
                "onednn_gflops": round(flop / dnn_ms / 1e6),
                "onednn_speedup": round(mkl_ms / dnn_ms, 2),
                "max_abs_diff": diff,
                "layer_fwd_bwd_mkl_ms": layer_mkl,
                "layer_fwd_bwd_onednn_ms": layer_dnn,
                "layer_onednn_speedup": round(layer_mkl / layer_dnn, 2),
                "auto_route": "onednn" if linear._onednn_faster(n) else "mkl",
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
