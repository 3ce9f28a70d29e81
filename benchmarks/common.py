"""What every benchmark shares: repeated timing with medians, the machine's description, the JSON output."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Callable


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default, except where there is none to show (None, False, "") or the help
    text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or action.default == "" or "default" in text:
            return text
        return super()._get_help_string(action)


TORCH_HINT = "pip install torch, or the project's extra: pip install -e '.[torch]'"


def torch_skip_note() -> str:
    """Says on stderr, in one line, that the JAX/PyTorch comparison is skipped because torch cannot be
    imported, and how to get it; returns the reason to record in the JSON."""
    reason = "torch is not installed"
    print(f"note: the JAX/PyTorch comparison is skipped: {reason} (to get it: {TORCH_HINT})", file=sys.stderr,
          flush=True)
    return reason


def image_shape(parser: argparse.ArgumentParser, text: str) -> tuple[int, int, int]:
    """--image-shape "H,W,C" as a tuple; a malformed one ends the command through ``parser.error``."""
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        parser.error(f"--image-shape must be H,W,C, got {text!r}")
    return shape


def timed_repeats(run: Callable[[], None], repeats: int) -> dict[str, float]:
    """Runs ``run`` ``repeats`` times; median, min and max wall seconds (machines here are noisy)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return spread(seconds)


def time_training_steps(states, step: Callable, steps_per_repeat: int, repeats: int, in_flight: int = 2):
    """(first call seconds, ms per step statistics, final states) of ``step(states) -> (states, outputs)``
    applied again and again, at most ``in_flight`` steps unfinished as in the training loop (0 = unbounded,
    which deadlocks XLA:CPU with several devices); the first call compiles, ten more warm up."""
    import jax
    from oat_jax import dispatch
    holder = {"states": states}

    def run(count):
        states, pending = holder["states"], dispatch.InFlight(in_flight)
        for _ in range(count):
            states, outputs = step(states)
            pending.add(jax.tree.leaves(outputs)[0], lambda: "a benchmark step")
        pending.drain()
        holder["states"] = states

    started = time.perf_counter()
    run(1)
    first = time.perf_counter() - started
    run(10)
    stats = timed_repeats(lambda: run(steps_per_repeat), repeats)
    return first, scaled(stats, 1e3 / steps_per_repeat), holder["states"]


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def scaled(stats: dict[str, float], factor: float) -> dict[str, float]:
    """The same statistics in other units (e.g. milliseconds per step)."""
    return {k: (v * factor if k != "repeats" else v) for k, v in stats.items()}


def ratio(numerator: dict[str, float], denominator: dict[str, float]) -> float:
    return numerator["median"] / denominator["median"]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (None where /proc/loadavg is missing): how busy the
    machine was around a measurement."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    """The device, the software versions and the date: which card or CPU a figure belongs to."""
    import jax
    device = jax.devices()[0]
    description = getattr(device, "device_kind", str(device))
    if device.platform == "cpu":
        description = f"{_cpu_name()} ({os.cpu_count()} cores)"
    return {
        "device": description,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "tensorflow_imported": "tensorflow" in sys.modules,
    }


def emit(result: dict, out: str | None) -> None:
    """One JSON object on stdout; also written to ``out`` when given."""
    main = sys.modules["__main__"]
    module = getattr(getattr(main, "__spec__", None), "name", None) or os.path.basename(sys.argv[0])
    flags = [f"XLA_FLAGS={os.environ['XLA_FLAGS']}"] if os.environ.get("XLA_FLAGS") else []
    result.setdefault("command", " ".join([*flags, "python -m", module, *sys.argv[1:]]))
    text = json.dumps(result, indent=2, sort_keys=True)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")
