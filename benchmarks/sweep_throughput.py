"""Which way of running many runs gives the most epochs per hour here: K seeds in one program
(``--config.num_seeds=K``) and P programs side by side, each the real ``oat_jax.main`` on the real dataset.

    python -m benchmarks.sweep_throughput --out benchmarks/results/cpu_sweep_throughput.json

Each setup trains ``--epochs`` epochs of cross-entropy per seed (the first one, with compilation, is left
out); its throughput is the seeds' steady epochs per hour, summed over the programs that run at once. An
epoch here is a training pass, the test set's evaluation and the validation split's, as a sweep's epoch is.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.common import HelpFormatter, emit, environment


def run_setup(seeds: int, programs: int, args, folder: str) -> dict:
    """P programs of K seeds each, started together; their steady epoch times and throughput."""
    processes, workdirs = [], []
    started = time.perf_counter()
    for program in range(programs):
        workdir = os.path.join(folder, f"k{seeds}_p{programs}_{program}")
        workdirs.append(workdir)
        command = [sys.executable, "-m", "oat_jax.main", f"--config={args.config}", f"--workdir={workdir}",
                   "--config.arms=ce", f"--config.num_epochs={args.epochs}", "--config.pretrain_epochs=1",
                   f"--config.num_seeds={seeds}", f"--config.seed={100 * program}",
                   f"--config.validation_size={args.validation_size}", "--config.progress=false",
                   *args.overrides]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for process in processes:
        _, errors = process.communicate()
        if process.returncode:
            raise SystemExit(f"error: a benchmark run failed (exit {process.returncode}): "
                             f"{errors.strip().splitlines()[-1] if errors.strip() else 'no output'}")
    wall = time.perf_counter() - started
    steady = []
    for workdir in workdirs:
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        steady += sorted({r["epoch"]: r["epoch_seconds"] for r in records if r["epoch"] > 1}.values())
    epoch_seconds = statistics.median(steady)
    return {"num_seeds": seeds, "programs": programs, "epoch_seconds_median": epoch_seconds,
            "epoch_seconds": steady, "wall_seconds": wall,
            "epochs_per_hour": programs * seeds * 3600.0 / epoch_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist_tuned.py", help="the experiment's config")
    parser.add_argument("--setups", default="1x1,1x2,2x1,2x2,5x1",
                        help="KxP: K seeds in one program, P programs side by side")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each seed (the first is left out)")
    parser.add_argument("--validation-size", default="6000", help="held-out validation samples")
    parser.add_argument("--out", help="write the JSON here")
    args, args.overrides = parser.parse_known_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first, compiling, is left out)")
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for setup in args.setups.split(","):
            seeds, programs = (int(v) for v in setup.split("x"))
            result = run_setup(seeds, programs, args, folder)
            print(f"K={seeds} P={programs}: {result['epoch_seconds_median']:.1f} s an epoch, "
                  f"{result['epochs_per_hour']:.0f} epochs per hour", flush=True)
            results.append(result)
    best = max(results, key=lambda r: r["epochs_per_hour"])
    emit({"benchmark": "sweep_throughput", "command": "python -m benchmarks.sweep_throughput " + " ".join(sys.argv[1:]),
          "environment": environment(), "config": args.config, "overrides": args.overrides, "setups": results,
          "best": {"num_seeds": best["num_seeds"], "programs": best["programs"]}}, args.out)


if __name__ == "__main__":
    main()
