"""Soak test: train the fast preset for a while and watch every process's memory (issue 6).

    python benchmarks/soak.py --minutes 30 [--interval-s 60] [--warmup-minutes 2]
        [--max-growth-pct 5] [--run-dir DIR] [section.key=value ...]

Starts `train.py` (configs/default.yaml, local backend unless overridden) and every
`--interval-s` prints one JSON object: the RSS of each process of the train.py tree, their sum,
the /dev/shm bytes the tree maps (each shared file counted once) and the whole /dev/shm use,
and the training progress. At the end it stops the run with SIGINT and prints a summary:
growth of the total RSS, of each process that lived through the measured window, and of
/dev/shm, from the first sample after the warm-up to the last. Exit code 1 if any growth
exceeds `--max-growth-pct` or train.py did not exit cleanly.

Summed RSS counts pages shared between processes (the shared rollout slots and weights) once
per process that touched them; the per-process figures are what a leak would move. Run it under
the bench lock on a quiet machine; the allocator settings (GLIBC_TUNABLES) are inherited.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
_PROGRESS = re.compile(r"([\d.]+)([kMGT]?)/\S+ steps \([^)]*\) \| ([\d,.]+|--) SPS")
_SCALE = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def role_of(proc: psutil.Process, root_pid: int) -> str:
    """learner (train.py itself), actor, resource_tracker or the command's first word."""
    if proc.pid == root_pid:
        return "learner"
    cmdline = " ".join(proc.cmdline())
    if "spawn_main" in cmdline:
        return "actor"
    if "resource_tracker" in cmdline:
        return "resource_tracker"
    return proc.name()


def shm_mapped_bytes(procs: list[psutil.Process]) -> int:
    """Bytes of /dev/shm files mapped by `procs`, each file counted once."""
    sizes: dict[str, int] = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for region in proc.memory_maps(grouped=True):
                if region.path.startswith("/dev/shm/"):
                    sizes[region.path] = max(sizes.get(region.path, 0), region.size)
    return sum(sizes.values())


def shm_used_bytes() -> int:
    """Used bytes of the /dev/shm file system (every process on the machine)."""
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def last_progress(output: Path) -> tuple[int | None, float | None]:
    """(agent steps, SPS) from the newest progress line train.py printed, if any."""
    found = _PROGRESS.findall(output.read_text(errors="replace"))
    if not found:
        return None, None
    count, unit, sps = found[-1]
    return int(float(count) * _SCALE[unit]), None if sps == "--" else float(sps.replace(",", ""))


def sample(root: psutil.Process, started: float, output: Path) -> dict:
    """One measurement of the train.py process tree."""
    procs = [root, *root.children(recursive=True)]
    rows = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            rows.append(
                {
                    "pid": proc.pid,
                    "role": role_of(proc, root.pid),
                    "rss_mb": round(proc.memory_info().rss / MB, 1),
                }
            )
    steps, sps = last_progress(output)
    return {
        "t_s": round(time.monotonic() - started, 1),
        "steps": steps,
        "sps": sps,
        "rss_total_mb": round(sum(r["rss_mb"] for r in rows), 1),
        "shm_mapped_mb": round(shm_mapped_bytes(procs) / MB, 1),
        "shm_used_mb": round(shm_used_bytes() / MB, 1),
        "processes": rows,
    }


def growth_pct(before: float, after: float) -> float | None:
    return round(100.0 * (after - before) / before, 2) if before > 0 else None


def summarize(samples: list[dict], warmup_s: float, limit_pct: float) -> dict:
    """Growth from the first sample at or after the warm-up to the last sample."""
    measured = [s for s in samples if s["t_s"] >= warmup_s]
    if len(measured) < 2:
        return {"summary": True, "error": "fewer than two samples after the warm-up"}
    first, last = measured[0], measured[-1]
    before = {p["pid"]: p for p in first["processes"]}
    per_process = [
        {
            "pid": p["pid"],
            "role": p["role"],
            "rss_mb_start": before[p["pid"]]["rss_mb"],
            "rss_mb_end": p["rss_mb"],
            "growth_pct": growth_pct(before[p["pid"]]["rss_mb"], p["rss_mb"]),
        }
        for p in last["processes"]
        if p["pid"] in before
    ]
    replaced = sorted(set(before) ^ {p["pid"] for p in last["processes"]})
    growths = {
        "rss_total_growth_pct": growth_pct(first["rss_total_mb"], last["rss_total_mb"]),
        "shm_mapped_growth_pct": growth_pct(first["shm_mapped_mb"], last["shm_mapped_mb"]),
        "max_process_growth_pct": max(
            (p["growth_pct"] for p in per_process if p["growth_pct"] is not None), default=None
        ),
    }
    within = all(g is None or g <= limit_pct for g in growths.values())
    return {
        "summary": True,
        "window_s": [first["t_s"], last["t_s"]],
        "steps": [first["steps"], last["steps"]],
        "rss_total_mb": [first["rss_total_mb"], last["rss_total_mb"]],
        "rss_total_mb_max": max(s["rss_total_mb"] for s in measured),
        "shm_mapped_mb": [first["shm_mapped_mb"], last["shm_mapped_mb"]],
        "shm_used_mb": [first["shm_used_mb"], last["shm_used_mb"]],
        **growths,
        "processes": per_process,
        "pids_changed": replaced,
        "limit_pct": limit_pct,
        "within_limit": within,
    }


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> int | None:
    """SIGINT (a clean stop with a final checkpoint), then kill the tree if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            proc.kill()
            proc.wait(10)
            return None
    return proc.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    parser.add_argument("--interval-s", type=float, default=60.0, help="seconds between samples")
    parser.add_argument("--warmup-minutes", type=float, default=2.0, help="not counted in growth")
    parser.add_argument("--max-growth-pct", type=float, default=5.0, help="pass/fail limit")
    parser.add_argument("--config", default="configs/default.yaml", help="train.py preset")
    parser.add_argument("--run-dir", help="keep the run here (default: a temp folder, removed)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args()
    if not (args.minutes > 0 and args.interval_s > 0 and args.warmup_minutes >= 0):
        parser.error("--minutes and --interval-s must be > 0, --warmup-minutes >= 0")
    scratch = None if args.run_dir else Path(tempfile.mkdtemp(prefix="deltabeast-soak-"))
    run_dir = Path(args.run_dir) if args.run_dir else scratch / "run"
    output = (scratch or run_dir.parent) / "soak-train.out"
    command = [
        sys.executable,
        "train.py",
        "--config",
        args.config,
        "runtime.backend=local",
        f"run.dir={run_dir}",
        *args.overrides,
    ]
    header = {
        "benchmark": "soak",
        "command": command[1:],
        "minutes": args.minutes,
        "interval_s": args.interval_s,
        "warmup_minutes": args.warmup_minutes,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(header), flush=True)
    samples: list[dict] = []
    code = None
    with open(output, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        root = psutil.Process(proc.pid)
        started = time.monotonic()
        end = started + 60.0 * args.minutes
        next_sample = started + args.interval_s
        while time.monotonic() < end and proc.poll() is None:
            time.sleep(max(0.0, min(next_sample, end) - time.monotonic()))
            if proc.poll() is not None:
                break
            if time.monotonic() >= next_sample:
                samples.append(sample(root, started, output))
                print(json.dumps(samples[-1]), flush=True)
                next_sample += args.interval_s
        crashed = proc.poll() is not None
        code = stop(proc)
    finally:
        if proc.poll() is None:
            stop(proc, timeout_s=5.0)
    summary = summarize(samples, 60.0 * args.warmup_minutes, args.max_growth_pct)
    summary["train_exit_code"] = code
    summary["train_ended_early"] = crashed
    print(json.dumps(summary), flush=True)
    if code != 0 or crashed:
        print(output.read_text(errors="replace")[-3000:], file=sys.stderr)
    elif scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0 if summary.get("within_limit") and code == 0 and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())
