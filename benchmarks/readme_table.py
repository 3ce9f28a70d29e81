"""Writes the benchmark tables of benchmarks/README.md from the JSON files in benchmarks/results/, never by hand.

    python -m benchmarks.readme_table            # rewrites the part of benchmarks/README.md between the markers
    python -m benchmarks.readme_table --check    # exits 1 if benchmarks/README.md is not what the files give
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
README = os.path.join(ROOT, "benchmarks", "README.md")  # where the tables live (the project README links to it)


def _ms(stats):
    return f"{stats['median']:.2f} ({stats['min']:.2f}–{stats['max']:.2f})"


def _s(stats):
    return f"{stats['median']:.2f}"


def _step_rows(result, name):
    env, jx, ratios = result["environment"], result["jax"], result["ratios"]
    setup = result["setup"]
    torch = result.get("torch", {}).get("train_ms", {})
    shape = "×".join(str(v) for v in setup["image_shape"])
    return [
        f"| `{name}` | {env['device']} | {env['date']} | {setup['model']}, {shape}, batch {setup['batch_size']} | "
        f"{_ms(jx['train_ms']['ce'])} | {_ms(jx['train_ms']['oat'])} | {ratios['oat_over_ce_train']:.3f} | "
        f"{_ms(jx['eval_ms']['ce'])} | {_ms(jx['eval_ms']['oat'])} | {ratios['oat_over_ce_eval']:.3f} | "
        + (f"{_ms(torch['ce'])} | {_ms(torch['oat'])} | {ratios['jax_over_torch_train_ce']:.2f} / "
           f"{ratios['jax_over_torch_train_oat']:.2f} |" if torch else "– | – | – |")
    ]


def _seed_rows(result, name):
    env, setup = result["environment"], result["setup"]
    rows = []
    for replicas, figures in sorted(result["jax"].get("seeds", {}).items(), key=lambda item: int(item[0])):
        rows.append(f"| `{name}` | {env['device']} | {env['date']} | {setup['model']}, "
                    f"{'×'.join(str(v) for v in setup['image_shape'])}, batch {setup['batch_size']} | {replicas} | "
                    f"{_ms(figures['train_ms'])} | {figures['per_seed_ms']:.2f} | "
                    f"{figures['per_seed_samples_per_s']:.0f} |")
    return rows


def _pair(ratios, name):
    """"CE / OAT" of a ratio computed per objective, "–" where it was not measured."""
    return " / ".join(f"{ratios[f'{name}_{o}']:.2f}" if f"{name}_{o}" in ratios else "–" for o in ("ce", "oat"))


def _epoch_rows(result, name):
    env = result["environment"]
    rows = []
    for dataset, figures in result["datasets"].items():
        arms, ratios, evals = figures["arms"], figures["ratios"], figures["evaluation"]

        def steady(arm):
            return _ms(arms[arm]["steady_epoch_s"]) if arm in arms else "–"

        def over_torch(objective):
            key = f"jax_over_torch_epoch_{objective}"
            return f"{ratios[key]:.2f}" if key in ratios else "–"

        rows.append(
            f"| `{name}` | {env['device']} | {env['date']} | {dataset} ({figures['train_samples']} / "
            f"{figures['test_samples']}) | {steady('ce')} | {steady('oat')} | {steady('torch_ce')} | "
            f"{steady('torch_oat')} | {over_torch('ce')} | {over_torch('oat')} | {ratios['oat_over_ce_epoch']:.3f} | "
            f"{_pair(ratios, 'fused_over_stepwise_epoch')} | {_pair(ratios, 'first_over_steady')} | "
            f"{_ms(evals['eval_s']['ce'])} | {_ms(evals['eval_s']['oat'])} | "
            f"{_ms(evals['eval_s']['oat_class_anchors'])} + {_s(evals['class_anchor_precompute_s'])} | "
            f"{result['peak_rss_mb']:.0f} |")
    return rows


def _scaling_rows(result, name):
    env, setup = result["environment"], result["setup"]
    rows = []
    for count, figures in result["by_devices"].items():
        ms, efficiency = figures["train_ms"], figures.get("efficiency", {})
        rows.append(
            f"| `{name}` | {env['device']} | {env['date']} | {setup['model']}, "
            f"{'×'.join(map(str, setup['image_shape']))}, {setup['per_device_batch']} per device | {count} of "
            f"{env['device_count']} | {figures['global_batch']} | {_ms(ms['ce'])} | {_ms(ms['oat'])} | "
            f"{_ms(ms['oat_device_anchor'])} | {figures['oat_over_ce']:.3f} | "
            + " / ".join(f"{efficiency[arm]:.2f}" if arm in efficiency else "–" for arm in ("ce", "oat")) + " |")
    return rows


# The GPU check (benchmarks.gpu_check): one file holds several benchmarks' results, one part each.

def _passed(result, part):
    """A part's result where it passed, else None (its rows are then left out)."""
    record = result["parts"].get(part, {})
    return record.get("result") if record.get("status") == "passed" else None


def _where(result, name):
    env = result.get("environment") or {}
    return f"| `{name}` | {env.get('device', '?')} | {env.get('date', '?')} |"


def _setup(setup):
    override = ", ".join(f"{k}={v}" for k, v in setup.get("model_override", {}).items())
    return (f"{setup['model']}{f' ({override})' if override else ''}, "
            f"{'×'.join(str(v) for v in setup['image_shape'])}, batch {setup['batch_size']}")


def _gpu_step_rows(result, name):
    rows = []
    for part in ("step_lightweight", "step_wrn28_10_b32", "step_wrn28_10_b128"):
        step = _passed(result, part)
        if not step:
            continue
        jx, torch, batch = step["jax"], step.get("torch", {}).get("train_ms"), step["setup"]["batch_size"]
        rate = " / ".join(f"{1e3 * batch / jx['train_ms'][arm]['median']:.0f}" for arm in ("ce", "oat"))
        rows.append(f"{_where(result, name)} {_setup(step['setup'])} | {_ms(jx['train_ms']['ce'])} | "
                    f"{_ms(jx['train_ms']['oat'])} | {step['ratios']['oat_over_ce_train']:.3f} | "
                    f"{_ms(jx['eval_ms']['ce'])} | {_ms(jx['eval_ms']['oat'])} | "
                    + (f"{_ms(torch['ce'])} | {_ms(torch['oat'])} | {step['ratios']['jax_over_torch_train_ce']:.2f} / "
                       f"{step['ratios']['jax_over_torch_train_oat']:.2f} |" if torch else "– | – | – |")
                    + f" {rate} |")
    return rows


def _epoch_loop_row(prefix, loop, arms, ce, oat, samples, torch=None):
    """One loop's steady epochs: seconds, OAT/CE, training samples per second, and against PyTorch."""
    def rate(arm):
        return f"{samples / arms[arm]['steady_train_s']['median']:.0f}"

    def versus(arm, other):
        return f"{arms[arm]['steady_epoch_s']['median'] / torch[other]['steady_epoch_s']['median']:.2f}"

    ratio = arms[oat]["steady_epoch_s"]["median"] / arms[ce]["steady_epoch_s"]["median"]
    against = f"{versus(ce, 'torch_ce')} / {versus(oat, 'torch_oat')}" if torch else "–"
    return (f"{prefix} {loop} | {_ms(arms[ce]['steady_epoch_s'])} | {_ms(arms[oat]['steady_epoch_s'])} | "
            f"{ratio:.3f} | {rate(ce)} / {rate(oat)} | {against} |")


def _gpu_epoch_rows(result, name):
    epoch, alone = _passed(result, "epoch_fashion_mnist"), _passed(result, "torch_cuda")
    rows = []
    if epoch:
        figures = next(iter(epoch["datasets"].values()))
        arms, samples = figures["arms"], figures["train_samples"]
        prefix = f"{_where(result, name)} {next(iter(epoch['datasets']))} ({samples} / {figures['test_samples']}) |"
        torch = arms if "torch_ce" in arms else None
        rows.append(_epoch_loop_row(prefix, "JAX, step by step", arms, "ce", "oat", samples, torch))
        if "ce_fused" in arms:
            rows.append(_epoch_loop_row(prefix, "JAX, fused", arms, "ce_fused", "oat_fused", samples, torch))
        if torch:
            loop = f"PyTorch ({epoch['setup'].get('torch_device', 'cpu')}), eager, same process"
            rows.append(_epoch_loop_row(prefix, loop, arms, "torch_ce", "torch_oat", samples))
    if alone and "steady_epoch_s" in alone["epochs"]["arms"]["ce"]:
        figures = alone["epochs"]
        prefix = (f"{_where(result, name)} {figures['dataset']} ({figures['train_samples']} / "
                  f"{figures['test_samples']}) |")
        rows.append(_epoch_loop_row(prefix, f"PyTorch ({alone['torch']['device']}), eager, alone", figures["arms"],
                                    "ce", "oat", figures["train_samples"]))
    return rows


def _gpu_seed_rows(result, name):
    replicas = _passed(result, "replicas")
    return _seed_rows({**replicas, "environment": result.get("environment") or {}}, name) if replicas else []


def _gpu_run_rows(result, name):
    env, parts = result.get("environment") or {}, result["parts"]
    versions = env.get("packages", {})
    passed = sum(record["status"] == "passed" for record in parts.values())
    cli, run = _passed(result, "cli"), "– | – | –"
    if cli:
        dataset, accuracy = cli["summary"]["dataset"], cli["test_accuracy"]
        run = (f"{parts['cli']['seconds']:.1f} | {dataset['train_samples']} / {dataset['test_samples']} | "
               f"{accuracy['ce']:.2f} / {accuracy['oat']:.2f}")
    return [f"{_where(result, name)} {versions.get('jax', '?')} / {versions.get('torch', '–')} | "
            f"{passed} of {len(parts)}{' (' + ', '.join(result['failed']) + ' not)' if result['failed'] else ''}"
            f"{', dry run' if result.get('dry_run') else ''} | "
            f"{result['seconds']:.0f} | {run} |"]


def _gpu_section(files):
    """The GPU check's tables, from its files (name, result)."""
    step = [row for name, result in files for row in _gpu_step_rows(result, name)]
    epoch = [row for name, result in files for row in _gpu_epoch_rows(result, name)]
    seeds = [row for name, result in files for row in _gpu_seed_rows(result, name)]
    runs = [row for name, result in files for row in _gpu_run_rows(result, name)]
    lines = ["GPU check (`python -m benchmarks.gpu_check`): each benchmark once, one after the other, each in a "
             "process of its own on the same GPU; a part that did not pass has no row.", "",
             "| file | device | date | jax / torch | parts passed | check (s) | end-to-end CLI run, 2 epochs (s) | "
             "train / test samples | test accuracy CE / OAT |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |", *runs, ""]
    if epoch:
        lines += ["Whole epochs on the GPU (training pass + whole-test-set evaluation, as the CLI runs them; "
                  "seconds, median (min–max) over the steady epochs 2..N): JAX step by step and fused into one "
                  "compiled loop, against PyTorch's eager loop in the same process (interleaved) and alone. "
                  "Samples/s are of the training pass; \"vs PyTorch\" is epoch time over the interleaved PyTorch "
                  "epoch's.", "",
                  "| file | device | date | dataset (train / test) | loop | epoch CE | epoch OAT | OAT/CE | "
                  "samples/s CE / OAT | vs PyTorch CE / OAT |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *epoch, ""]
    if step:
        lines += ["Step time on the GPU, ms per step: median (min–max) over repetitions.", "",
                  "| file | device | date | setup | train CE | train OAT | OAT/CE | eval CE | eval OAT | PyTorch CE "
                  "| PyTorch OAT | JAX/PyTorch CE / OAT | samples/s CE / OAT |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *step, ""]
    if seeds:
        lines += ["Several seeds in one program on the GPU: a cross-entropy step of K replicas.", "",
                  "| file | device | date | setup | K | ms per step (K replicas) | ms per seed | samples/s per seed |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |", *seeds, ""]
    return lines


def render(results_dir: str) -> str:
    step, seeds, epoch, scaling, gpu = [], [], [], [], []
    for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
        with open(path) as f:
            result = json.load(f)
        name = os.path.basename(path)
        if result.get("benchmark") == "step_time":
            step += _step_rows(result, name)
            seeds += _seed_rows(result, name)
        elif result.get("benchmark") == "epoch_time":
            epoch += _epoch_rows(result, name)
        elif result.get("benchmark") == "scaling":
            scaling += _scaling_rows(result, name)
        elif result.get("benchmark") == "gpu_check":
            gpu.append((name, result))
    lines = [START, "",
             "Generated by `python -m benchmarks.readme_table` from `benchmarks/results/`; each row is one run "
             "of the command named in its file, so its ratios compare figures measured side by side.", ""]
    if step:
        lines += ["Step time, ms per step: median (min–max) over repetitions (`python -m benchmarks.step_time`).",
                  "",
                  "| file | device | date | setup | train CE | train OAT | OAT/CE | eval CE | eval OAT | OAT/CE "
                  "| PyTorch CE | PyTorch OAT | JAX/PyTorch CE / OAT |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *step, ""]
    if seeds:
        lines += ["Several seeds in one program (`--config.num_seeds=K`): a cross-entropy step of K replicas, "
                  "and the time and throughput per seed.", "",
                  "| file | device | date | setup | K | ms per step (K replicas) | ms per seed | samples/s per seed |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |", *seeds, ""]
    if epoch:
        lines += ["Whole epochs of the default workload as the CLI runs it (training pass + whole-test-set "
                  "evaluation with the arm's decoding; lightweight CNN, batch 32, SGD 0.001 / 0.9), JAX step by step "
                  "against a PyTorch eager loop measured interleaved in the same process "
                  "(`python -m benchmarks.epoch_time`): seconds, median (min–max) over the steady epochs 2..N. "
                  "Ratios are quotients of those medians; fused/stepwise is the JAX epoch fused into one compiled "
                  "loop over the step-by-step one; first/steady is the first epoch less its measured compile "
                  "time over the steady median. Evaluations (seconds, median (min–max) over repeats) are of the "
                  "final OAT state: argmax, OAT's batch anchors, and the paper's slower alternative, per-class "
                  "anchors (evaluation + their precomputation over the training set).", "",
                  "| file | device | date | dataset (train / test) | epoch CE, JAX | epoch OAT, JAX | epoch CE, "
                  "PyTorch | epoch OAT, PyTorch | JAX/PyTorch CE | JAX/PyTorch OAT | OAT/CE (JAX) | fused/stepwise "
                  "CE / OAT | first epoch − compile / steady, CE / OAT | eval CE | eval OAT | eval class anchors "
                  "+ precompute | peak RSS (MB) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
                  "| --- |", *epoch, ""]
    if scaling:
        lines += ["Data-parallel scaling, ms per training step on the first N devices with a fixed batch per "
                  "device (`python -m benchmarks.scaling`); efficiency = samples/s on N / (N × samples/s on one). "
                  "Forced CPU devices share the same cores: their rows show the partitioning's cost, not a speed-up.",
                  "", "| file | device | date | setup | N devices | global batch | CE | OAT | OAT, per-device anchor | "
                  "OAT/CE | efficiency CE / OAT |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |", *scaling, ""]
    if gpu:
        lines += _gpu_section(gpu)
    if not step and not epoch and not scaling and not gpu:
        lines += ["No benchmark results are recorded yet.", ""]
    return "\n".join(lines + [END])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--readme", default=README, help="the Markdown file holding the markers")
    parser.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    with open(args.readme) as f:
        readme = f.read()
    if START not in readme or END not in readme:
        sys.exit(f"error: {args.readme} has no {START} ... {END} section")
    head, rest = readme.split(START, 1)
    updated = head + render(args.results) + rest.split(END, 1)[1]
    if args.check:
        sys.exit(0 if updated == readme else f"{os.path.relpath(args.readme, ROOT)}'s benchmark tables are out of "
                 "date: run python -m benchmarks.readme_table")
    with open(args.readme, "w") as f:
        f.write(updated)


if __name__ == "__main__":
    main()
