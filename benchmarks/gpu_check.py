"""One call that checks and times the project on a GPU machine, each benchmark in a process of its own.

    python -m benchmarks.gpu_check [--out FILE.json] [--data-dir DIR] [--budget-s 450] [--parts NAME,...]
    python -m benchmarks.gpu_check --dry-run [--out FILE.json]    # the same sequence on the CPU, at toy sizes

First a probe records the environment (Python, jax and its backend, the devices, torch and CUDA, the versions
of the project's packages, where Fashion-MNIST was found); then the parts run in this order:

- ``step_lightweight``: ``benchmarks.step_time``, both arms (cross-entropy and OAT) of the lightweight CNN at
  32x32x3, batch 32, with the PyTorch loop on the same GPU;
- ``step_wrn28_10_b32``, ``step_wrn28_10_b128``: the same for WRN-28-10 at batch 32 and 128;
- ``epoch_fashion_mnist``: ``benchmarks.epoch_time`` on Fashion-MNIST, JAX step by step and fused, against the
  PyTorch loop on CUDA;
- ``replicas``: K = 1, 4 and 8 replicas in one step (``step_time --seeds``);
- ``cli``: a short end-to-end run of ``python -m oat_jax.main`` (configs/default.py, fused epochs, 2 epochs):
  its wall time, the accuracies it printed, its summary.json and its epochs' seconds;
- ``torch_cuda``: ``benchmarks.torch_reference`` alone on CUDA (no JAX in the process).

A part that fails or outlives its timeout is recorded with its error, and the others still run; all of them
share an overall time budget (``--budget-s``: a part never gets more than what is left, and one that would get
too little is skipped). The exit status is 0 only when every part passed. One JSON file holds everything
(each part's command, seconds, status and figures): ``benchmarks/results/gpu_check_<device>.json`` (the device
as JAX names it, e.g. ``gpu_check_nvidia_h200.json``) or ``--out``; when it lies in ``benchmarks/results/``,
benchmarks/README.md's tables are regenerated (``benchmarks.readme_table``). ``--dry-run`` runs the same
parts on the CPU at toy sizes (WRN-28-10's module at depth 10 and width 1 on 8x8 images, a few steps, 64
samples, K = 1 and 2), with cheap compilation and a compilation cache shared by the parts, to check the
sequence before a GPU is lent (about 140 s of CPU time); it writes to ``--out`` (default: the system's
temporary folder) and never touches benchmarks/README.md unless ``--out`` lies in ``benchmarks/results/``.

Preparing a GPU machine without network, whose Python already has jax with CUDA, flax, optax,
orbax-checkpoint, numpy and torch (the wheels are pure Python; match --python-version to python3 there):

    # here, with network, in the repository root
    echo gpu_carry/ >> .git/info/exclude
    mkdir -p gpu_carry/wheels gpu_carry/fashion-mnist
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d gpu_carry/wheels \\
        ml-collections==1.1.0 tensorboardX==2.6.5 tensorflow-datasets==4.9.10
    python3 -m pip wheel --no-deps -w gpu_carry/wheels .
    cp /usr/share/datasets/fashion-mnist/*-ubyte.gz gpu_carry/fashion-mnist/
    # copy the repository, gpu_carry/ included, to the GPU machine; there, in its root:
    python3 -m pip install -q --no-index --no-deps gpu_carry/wheels/*.whl && \\
        python3 -m benchmarks.gpu_check --data-dir gpu_carry/fashion-mnist

and bring ``benchmarks/results/gpu_check_*.json`` back (``python -m benchmarks.readme_table`` then puts it in
benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
# Fewer compiler optimisations in the dry run: its figures mean nothing, and compiling dominates it on a CPU.
DRY_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MIN_PART_S = 15  # a part that would get less of the budget than this is skipped rather than started
TAIL_CHARS = 3000  # how much of a failed part's output is kept
# Modules the parts import, besides jax and torch: a GPU machine without network may lack them.
NEEDED_MODULES = ("flax", "optax", "orbax.checkpoint", "ml_collections", "tensorboardX", "absl", "numpy", "PIL")
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
            "ml-collections", "tensorflow-datasets", "tensorboardX", "numpy", "torch", "oat_jax")


@dataclasses.dataclass
class Part:
    """One step of the check: a Python command run from the repository root, and how its outcome is read."""
    name: str
    what: str
    argv: list[str]  # the arguments after "python"
    timeout_s: float
    result_file: str | None = None  # the JSON the command writes, read back into the record
    check: Callable[[dict], str | None] | None = None  # what is wrong with that result, or None
    collect: Callable[[str], dict] | None = None  # builds the result from the command's stdout instead
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # variables for this part alone


# Reading the parts' results.

def _finite_numbers(value, where="result") -> str | None:
    """The first NaN or infinity in a JSON value, named by its path (a figure that is not a number)."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{where} is {value}"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        problem = _finite_numbers(item, f"{where}.{key}")
        if problem:
            return problem
    return None


def _positive(stats: dict, what: str) -> str | None:
    return None if stats.get("median", 0) > 0 else f"{what} is not positive: {stats}"


def _check_step(result: dict) -> str | None:
    for table in ("train_ms", "eval_ms"):
        for arm in ("ce", "oat"):
            problem = _positive(result["jax"][table][arm], f"jax.{table}.{arm}")
            if problem:
                return problem
    return None


def _check_replicas(result: dict) -> str | None:
    counts = sorted(int(k) for k in result["jax"]["seeds"])
    expected = sorted(result["setup"]["seeds"])
    return None if counts == expected and counts else f"replica counts {counts}, expected {expected}"


def _check_epochs(result: dict) -> str | None:
    if "fashion_mnist" not in result["datasets"]:
        return "Fashion-MNIST was not measured: " + result["skipped"].get("fashion_mnist", "no reason given")
    arms = result["datasets"]["fashion_mnist"]["arms"]
    missing = {"ce", "oat", "ce_fused", "oat_fused"} - set(arms)
    if missing:
        return f"arms missing: {', '.join(sorted(missing))}"
    for name, arm in arms.items():
        problem = _positive(arm["steady_epoch_s"], f"{name}.steady_epoch_s")
        if problem:
            return problem
    return None


def _check_torch(result: dict) -> str | None:
    if "epochs" not in result:
        return "no epochs were timed: " + result.get("epochs_skipped", "no dataset")
    return _positive(result["train_ms"]["ce"], "train_ms.ce") or _positive(result["train_ms"]["oat"], "train_ms.oat")


def _collect_cli(workdir: str) -> Callable[[str], dict]:
    """Reads a CLI run back: the lines it printed from its table on, its own wall time, summary.json, and each
    epoch's seconds from metrics.jsonl (the anchors and other per-step records left out)."""
    def collect(stdout: str) -> dict:
        lines = stdout.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("test accuracy")), len(lines))
        wall = re.search(r"wall time ([0-9.]+) s", stdout)
        with open(os.path.join(workdir, "summary.json")) as f:
            summary = json.load(f)
        epochs = []
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            for line in f:
                record = json.loads(line)
                epochs.append({key: record.get(key) for key in ("arm", "epoch", "seed", "epoch_seconds",
                                                                "compile_seconds", "test_accuracy")})
        return {"printed": lines[first:], "reported_wall_s": float(wall.group(1)) if wall else None,
                "summary": summary, "epochs": epochs,
                "test_accuracy": {arm: figures.get("final_test_accuracy")
                                  for arm, figures in summary["arms"].items()}}
    return collect


def _check_cli(result: dict) -> str | None:
    accuracies = result["test_accuracy"]
    if set(accuracies) != {"ce", "oat"} or any(not isinstance(v, (int, float)) for v in accuracies.values()):
        return f"expected final accuracies of ce and oat, got {accuracies}"
    return None if result["reported_wall_s"] else "the run printed no wall time"


# The sequence.

def _step(name, what, scratch, args, timeout_s, check=_check_step) -> Part:
    out = os.path.join(scratch, f"{name}.json")
    return Part(name, what, ["-m", "benchmarks.step_time", *args, "--out", out], timeout_s, out, check)


def plan(dry_run: bool, scratch: str) -> list[Part]:
    """The parts, in order, at the GPU's sizes or the dry run's toy ones."""
    if dry_run:
        light, torch_device = ["--batch-size", "4", "--steps", "2", "--repeats", "1"], ["--torch-device", "cpu"]
        # WRN-28-10 takes seconds a step on a CPU: the same module at depth 10, width 1, on 8x8 images.
        wrn = ["--model-override", "depth=10,widen_factor=1", "--image-shape", "8,8,3", "--steps", "1",
               "--repeats", "1", "--seeds", "", "--no-torch"]
        wrn_batches = ("2", "2")
        epochs = ["--epochs", "2", "--train-limit", "64", "--test-limit", "64", "--eval-repeats", "1",
                  "--torch-device", "cpu"]
        cli = ["--config.train_limit=64", "--config.test_limit=64"]
        replicas = "1,2"  # each K compiles its own programs
        torch = ["--device", "cpu", "--batch-size", "4", "--steps", "2", "--repeats", "1", "--train-limit", "64",
                 "--test-limit", "64"]
        timeouts = dict.fromkeys(("light", "wrn", "epoch", "replicas", "cli", "torch"), 150)
    else:
        light, torch_device = ["--batch-size", "32"], []
        wrn = ["--image-shape", "32,32,3", "--steps", "30", "--repeats", "3", "--seeds", "", "--no-torch"]
        wrn_batches = ("32", "128")
        epochs = ["--epochs", "3", "--eval-repeats", "3"]
        cli, replicas = [], "1,4,8"
        torch = ["--device", "cuda"]
        timeouts = {"light": 120, "wrn": 180, "epoch": 180, "replicas": 120, "cli": 180, "torch": 120}
    workdir = os.path.join(scratch, "cli_workdir")
    epoch_out, torch_out = os.path.join(scratch, "epoch_fashion_mnist.json"), os.path.join(scratch, "torch.json")
    return [
        _step("step_lightweight", "step time, lightweight CNN, 32x32x3, both arms and the PyTorch loop", scratch,
              ["--model", "lightweight", "--image-shape", "32,32,3", "--seeds", "", *light, *torch_device],
              timeouts["light"]),
        *(_step(f"step_wrn28_10_b{gpu_batch}", f"step time, WRN-28-10, batch {gpu_batch}, both arms", scratch,
                ["--model", "wrn28_10", "--batch-size", batch, *wrn], timeouts["wrn"])
          for gpu_batch, batch in zip(("32", "128"), wrn_batches)),
        Part("epoch_fashion_mnist", "whole epochs on Fashion-MNIST: JAX step by step and fused, PyTorch",
             ["-m", "benchmarks.epoch_time", "--datasets", "fashion_mnist", *epochs, "--out", epoch_out],
             timeouts["epoch"], epoch_out, _check_epochs),
        _step("replicas", f"K = {replicas} replicas in one step (several seeds)", scratch,
              ["--model", "lightweight", "--image-shape", "32,32,3", "--seeds", replicas, "--no-torch", *light],
              timeouts["replicas"], _check_replicas),
        Part("cli", "end to end: python -m oat_jax.main, configs/default.py, fused epochs, 2 epochs",
             ["-m", "oat_jax.main", "--config", "configs/default.py", "--workdir", workdir,
              "--config.fused_epoch=True", "--config.num_epochs=2", "--config.pretrain_epochs=1",
              "--config.progress=False", "--config.compilation_cache=off", *cli],
             timeouts["cli"], None, _check_cli, _collect_cli(workdir)),
        Part("torch_cuda", "the PyTorch loop alone on CUDA: steps and Fashion-MNIST epochs",
             ["-m", "benchmarks.torch_reference", *torch, "--out", torch_out], timeouts["torch"], torch_out,
             _check_torch),
    ]


def part_environment(dry_run: bool, scratch: str, data_dir: str) -> dict[str, str]:
    """The variables the parts run with on top of this process's: the data folder; in a dry run the CPU, one
    PyTorch thread (more only spin on busy cores), cheap compilation and a compilation cache shared by the
    parts (unless one is set already)."""
    extra = {"PYTHONUNBUFFERED": "1"}
    if data_dir:
        extra["OAT_DATA_DIR"] = os.path.abspath(data_dir)
    if dry_run:
        extra.update(JAX_PLATFORMS="cpu", OMP_NUM_THREADS="1")
        extra["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), DRY_XLA_FLAGS)))
        if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
            extra["JAX_COMPILATION_CACHE_DIR"] = os.path.join(scratch, "xla_cache")
        for key in ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):
            if key not in os.environ:  # every program kept, the small ones too
                extra[key] = "0"
    return extra


# Running one part.

def _shown(argv: list[str], extra: dict[str, str], scratch: str) -> str:
    """The command as one could type it: the variables set for it, then ``python`` and its arguments."""
    words = [f"{key}={value}" for key, value in extra.items() if key != "PYTHONUNBUFFERED"] + ["python", *argv]
    return shlex.join(words).replace(scratch, "<scratch>")


def _children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's finished children: what a part cost the machine."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tail(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-TAIL_CHARS:]


def _wait(process: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit status, or None when the part ran out of time (its whole process group is then killed)."""
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None
    except BaseException:  # Ctrl-C: the part goes too, not only this process
        os.killpg(process.pid, signal.SIGKILL)
        raise


def run_part(part: Part, extra_env: dict[str, str], scratch: str, budget_left_s: float) -> dict:
    """Runs one part; its record: command, timeout, seconds, status (passed, failed, timed_out or skipped),
    exit code, error, and its result."""
    timeout = min(part.timeout_s, budget_left_s)
    record = {"what": part.what, "command": _shown(part.argv, {**extra_env, **part.env}, scratch),
              "timeout_s": round(timeout, 1)}
    if timeout < MIN_PART_S:
        return {**record, "status": "skipped", "seconds": 0.0,
                "error": f"the time budget was spent ({budget_left_s:.0f} s left)"}
    stdout_path, stderr_path = (os.path.join(scratch, f"{part.name}.{kind}") for kind in ("stdout", "stderr"))
    started, cpu_before = time.perf_counter(), _children_cpu_s()
    with open(stdout_path, "w") as stdout, open(stderr_path, "w") as stderr:
        # A session of its own, so that a timeout ends the part's children too.
        process = subprocess.Popen([sys.executable, *part.argv], cwd=ROOT,
                                   env={**os.environ, **extra_env, **part.env}, stdout=stdout, stderr=stderr,
                                   start_new_session=True)
        code = _wait(process, timeout)
    record.update(seconds=round(time.perf_counter() - started, 2), cpu_s=round(_children_cpu_s() - cpu_before, 2),
                  returncode=code)
    if code is None:
        return {**record, "status": "timed_out", "error": f"no result within {timeout:.0f} s; the output's end:\n"
                + _tail(stderr_path)}
    if code != 0:
        return {**record, "status": "failed", "error": f"exit status {code}; the output's end:\n" + _tail(stderr_path)}
    try:
        result = _read_result(part, stdout_path, scratch)
        problem = (part.check(result) if part.check else None) or _finite_numbers(result)
    except (OSError, ValueError, KeyError, TypeError) as error:
        result, problem = None, f"its result could not be read: {type(error).__name__}: {error}"
    record["result"] = result
    return {**record, "status": "failed", "error": problem} if problem else {**record, "status": "passed"}


def _read_result(part: Part, stdout_path: str, scratch: str) -> dict:
    if part.collect:
        with open(stdout_path) as f:
            result = part.collect(f.read())
        text = json.dumps(result)
    else:
        with open(part.result_file) as f:
            text = f.read()
    return json.loads(text.replace(scratch, "<scratch>"))  # the temporary folder means nothing later


# The environment.

def probe() -> dict:
    """What the figures belong to, read in a process of its own (importing jax and torch here would hold the
    GPU for the whole check)."""
    import importlib.metadata
    import importlib.util
    import platform
    from benchmarks import common
    from oat_jax.data import fashion_mnist
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "variables": {key: os.environ[key] for key in ("JAX_PLATFORMS", "XLA_FLAGS", "CUDA_VISIBLE_DEVICES",
                                                          "XLA_PYTHON_CLIENT_MEM_FRACTION", "OAT_DATA_DIR")
                         if key in os.environ}}
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    env["packages"] = packages
    env["missing_modules"] = [name for name in NEEDED_MODULES if importlib.util.find_spec(name.split(".")[0]) is None]
    folders = [os.environ.get("OAT_DATA_DIR", ""), fashion_mnist.DEFAULT_DIR]
    env["fashion_mnist"] = next((f for f in folders if f and not fashion_mnist.find_files(f)[1]), None)
    import jax
    devices = jax.devices()
    env["jax"] = {"version": jax.__version__, "backend": jax.default_backend(), "device_count": len(devices),
                  "device_kind": devices[0].device_kind, "devices": [str(d) for d in devices]}
    env["device"] = common.environment()["device"]
    env["torch"] = _torch_environment()
    env["nvidia_smi"] = _nvidia_smi()
    return env


def _torch_environment() -> dict | None:
    try:
        import torch
    except ImportError:
        return None
    found = {"version": torch.__version__, "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda}
    if found["cuda_available"]:
        found.update(device_count=torch.cuda.device_count(), device_name=torch.cuda.get_device_name(0))
    return found


def _nvidia_smi() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _probe_part(dry_run: bool) -> Part:
    # Without preallocation: the probe needs no GPU memory (and leaves before the parts start anyway).
    return Part("environment", "the environment: Python, jax, devices, torch, CUDA, packages",
                ["-m", "benchmarks.gpu_check", "--probe"], 60 if dry_run else 120,
                collect=json.loads, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "false"})


def slug(device_kind: str) -> str:
    """A file-name form of a device's name: "NVIDIA H200" -> "nvidia_h200"."""
    return re.sub(r"[^a-z0-9]+", "_", device_kind.lower()).strip("_") or "unknown"


# The whole check.

def _parse():
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[1:]))
    parser.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU at toy sizes")
    parser.add_argument("--out", help="the JSON file (default: benchmarks/results/gpu_check_<device>.json; in a dry "
                                      "run, gpu_check_dry_run.json in the temporary folder)")
    parser.add_argument("--data-dir", default="", help="a folder holding Fashion-MNIST's four IDX files (else "
                                                       "$OAT_DATA_DIR or the system's copy)")
    parser.add_argument("--budget-s", type=float, help="seconds for all the parts together (default: 450; "
                                                       "dry run: 300)")
    parser.add_argument("--parts", default="", help="only these parts, by name, separated by commas (default: all)")
    parser.add_argument("--no-readme", action="store_true", help="never regenerate benchmarks/README.md's tables")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the environment, as JSON
    parser.add_argument("--break-part", default="", help=argparse.SUPPRESS)  # tests: makes that part fail
    args = parser.parse_args()
    names = [part.name for part in plan(args.dry_run, "")]
    args.parts = [name for name in args.parts.split(",") if name] or names
    unknown = sorted(set(args.parts) - set(names))
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; the parts: {', '.join(names)}")
    if args.budget_s is None:
        args.budget_s = 300.0 if args.dry_run else 450.0
    return args


def _progress(index: int, count: int, name: str, record: dict) -> None:
    line = f"[{index}/{count}] {name}: {record['status']} in {record['seconds']:.1f} s"
    if "cpu_s" in record:
        line += f" ({record['cpu_s']:.1f} s of CPU)"
    if record["status"] != "passed":
        line += " - " + record["error"].splitlines()[0]
    print(line, flush=True)


def _warn(environment: dict) -> None:
    """Says at once what will make parts fail: modules that are not installed, Fashion-MNIST not found."""
    if environment.get("missing_modules"):
        print(f"warning: not installed: {', '.join(environment['missing_modules'])} (without network, carry their "
              "wheels: see python -m benchmarks.gpu_check --help)", flush=True)
    if environment.get("fashion_mnist", "") is None:
        print("warning: Fashion-MNIST not found (the epoch, cli and torch_cuda parts need it): pass --data-dir "
              "with its four IDX files, or set OAT_DATA_DIR", flush=True)


def _out_path(args, environment: dict | None) -> str:
    if args.out:
        return os.path.abspath(args.out)
    if args.dry_run:
        return os.path.join(tempfile.gettempdir(), "gpu_check_dry_run.json")
    kind = (environment or {}).get("jax", {}).get("device_kind", "unknown")
    return os.path.join(RESULTS, f"gpu_check_{slug(kind)}.json")


def _write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(result, indent=2) + "\n")
    os.replace(path + ".tmp", path)


def _in_results(path: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(RESULTS)]) == os.path.realpath(RESULTS)


def _regenerate_readme() -> bool:
    done = subprocess.run([sys.executable, "-m", "benchmarks.readme_table"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    print("benchmarks/README.md's tables regenerated" if done.returncode == 0
          else f"benchmarks/README.md not regenerated: {done.stderr.strip()}", flush=True)
    return done.returncode == 0


def check(args) -> int:
    """Runs the probe and the parts, writes the JSON; the exit status (0: all passed)."""
    started = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="oat_gpu_check_")
    try:
        extra = part_environment(args.dry_run, scratch, args.data_dir)
        parts = [part for part in plan(args.dry_run, scratch) if part.name in args.parts]
        for part in parts:
            if part.name == args.break_part:
                part.argv.append("--no-such-option")
        print(f"gpu_check{' (dry run)' if args.dry_run else ''}: {len(parts)} parts, budget {args.budget_s:.0f} s",
              flush=True)
        probed = run_part(_probe_part(args.dry_run), extra, scratch, args.budget_s)
        _progress(0, len(parts), "environment", probed)
        _warn(probed.get("result") or {})
        records = {}
        for index, part in enumerate(parts, 1):
            left = args.budget_s - (time.perf_counter() - started)
            records[part.name] = run_part(part, extra, scratch, left)
            _progress(index, len(parts), part.name, records[part.name])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    environment = probed.pop("result", None)
    failed = [name for name, record in records.items() if record["status"] != "passed"]
    if probed["status"] != "passed":
        failed.insert(0, "environment")
    result = {"benchmark": "gpu_check", "dry_run": args.dry_run,
              "command": shlex.join(["python", "-m", "benchmarks.gpu_check", *sys.argv[1:]]),
              "environment": environment, "environment_probe": probed, "budget_s": args.budget_s,
              "seconds": round(time.perf_counter() - started, 1), "parts": records,
              "passed": not failed, "failed": failed}
    out = _out_path(args, environment)
    _write(out, result)
    passed = sum(record["status"] == "passed" for record in records.values())
    print(f"{passed} of {len(records)} parts passed in {result['seconds']:.0f} s; wrote {out}", flush=True)
    readme_ok = True
    if _in_results(out) and not args.no_readme:
        readme_ok = _regenerate_readme()
    return 0 if not failed and readme_ok else 1


def main():
    args = _parse()
    if args.probe:
        print(json.dumps(probe()))
        return
    sys.exit(check(args))


if __name__ == "__main__":
    main()
