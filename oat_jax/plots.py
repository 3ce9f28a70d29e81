"""``python -m oat_jax.report plots <workdir>``: PNG figures of one run, from its metrics.jsonl and, for the
test-batch-size sweep, its checkpoints. Also the report's figure of arms compared paired by seed
(``python -m oat_jax.report ... --figure``).

Figures drawn from the telemetry that older runs do not log (the epoch-mean anchor, the prediction shares)
are skipped with a note for such runs. Several seeds are drawn as their mean with a min-max band. The
figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas, so plotting changes no
global matplotlib state (backend, open pyplot figures).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from oat_jax.eval_batch_sizes import DEFAULT_SIZES, RESULTS_FILE
from oat_jax.names import CE, OAT, PRETRAIN
from oat_jax.workdir import (METRICS_FILE, WorkdirError, read_config, read_json, read_records, replacing,
                             unwritable)

# One colour and one name per objective (oat_jax.objectives), each its own, so that no two arms look alike.
COLOURS = {PRETRAIN: "0.3", CE: "tab:blue", OAT: "tab:orange", "oat_paper": "tab:red",
           "oat_uniform": "tab:green", "square": "tab:purple", "ce_smooth": "tab:brown",
           "ce_logit_adjusted": "tab:pink", "oat_prior": "tab:olive"}
NAMES = {PRETRAIN: "cross-entropy pre-training", CE: "cross-entropy", OAT: "OAT",
         "oat_paper": "OAT, paper's anchor", "oat_uniform": "OAT, uniform anchor", "square": "square loss",
         "ce_smooth": "cross-entropy, smoothed labels", "ce_logit_adjusted": "cross-entropy, logit-adjusted",
         "oat_prior": "OAT, anchor fixed at softmax(π)"}
_STYLE = {"font.size": 11, "axes.titlesize": 12, "axes.grid": True, "grid.alpha": 0.3, "legend.fontsize": 9,
          "legend.framealpha": 0.9}


class Skip(Exception):
    """A figure the run has no data for; the message says why."""


@dataclass
class Run:
    """A run's config (``workdir.read_config``) and its metrics.jsonl records."""
    workdir: str
    config: dict
    records: list[dict]

    @property
    def pretrain_epochs(self) -> int:
        return int(self.config["pretrain_epochs"])

    @property
    def first_seed(self) -> int:
        return min(r["seed"] for r in self.records)

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for r in self.records})

    @property
    def num_classes(self) -> int | None:
        """C, from the logged anchors (None for runs that log none)."""
        return next((len(r["anchor"]) for r in self.records if r.get("anchor")), None)

    def subtitle(self, seeds: bool = True) -> str:
        """The dataset and model, the paper's cell where the config names one, and (``seeds``) how the seeds
        are drawn."""
        text = f"{self.config['dataset']}, {self.config['model']}"
        paper = self.config["paper"]
        if paper["table"]:
            text += f" ({paper['table']}: {paper['setting']})"
        if not seeds:
            return text
        ours = self.seeds
        return text + (f"; {len(ours)} seeds: mean, min–max band" if len(ours) > 1 else f"; seed {ours[0]}")

    def arm_records(self, arm: str, key: str) -> list[dict]:
        return sorted((r for r in self.records if r["arm"] == arm and r.get(key) is not None),
                      key=lambda r: (r["epoch"], r["seed"]))

    def chain(self, arm: str, key: str, whole_pretraining: bool = False) -> list[dict]:
        """An arm's records carrying ``key``, continuing the pre-training: the cross-entropy arm with all
        pre-training epochs, OAT from the last one (the state it starts from) or all of them."""
        pretrain = self.arm_records(PRETRAIN, key)
        if arm != CE and not whole_pretraining:
            pretrain = [r for r in pretrain if r["epoch"] == self.pretrain_epochs]
        return pretrain + self.arm_records(arm, key)


def load_run(workdir: str) -> Run:
    """The run in ``workdir``; WorkdirError (naming the workdir) if it has no config.json or no logged epoch."""
    if not os.path.isdir(workdir):
        raise WorkdirError(f"{workdir} is not a folder")
    try:
        config = read_config(workdir)
        path = os.path.join(workdir, METRICS_FILE)
        if not os.path.exists(path):
            raise WorkdirError(f"{METRICS_FILE} is missing: is this the workdir of a started run?")
        records = read_records(path)
        if not records:
            raise WorkdirError(f"{METRICS_FILE} holds no finished epoch yet")
    except WorkdirError as e:
        raise WorkdirError(f"{workdir}: {e}") from None
    return Run(workdir, config, records)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def _figure(height: float = 5.0) -> Figure:
    """A figure 8 inches wide whose layout makes room for titles, legends and colour bars."""
    return Figure(layout="constrained", figsize=(8, height))


def _by_epoch(records: list[dict], key: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Epochs (sorted) and, for each, the values of ``key`` in its records (one per seed; None, a figure that
    could not be computed, as NaN: a gap in the line)."""
    epochs = sorted({r["epoch"] for r in records})
    return np.array(epochs), [np.array([np.nan if r[key] is None else r[key] for r in records if r["epoch"] == e],
                                       dtype=float) for e in epochs]


def _band(ax, x, values: list[np.ndarray], colour, label, **line):
    """The mean over seeds as a line; with several seeds, their min-max range as a band around it."""
    mean = np.array([v.mean() for v in values])
    ax.plot(x, mean, color=colour, label=label, marker="o" if len(x) <= 30 else None, markersize=4, **line)
    if max(len(v) for v in values) > 1:
        ax.fill_between(x, [v.min() for v in values], [v.max() for v in values], color=colour, alpha=0.2,
                        linewidth=0)


def _draw_arms(ax, run: Run, key: str) -> None:
    """Every arm's ``key`` over epochs: the cross-entropy arm through the pre-training, the others (OAT, the
    controls) from its end."""
    drawn = 0
    others = [arm for arm in dict.fromkeys(r["arm"] for r in run.records) if arm not in (PRETRAIN, CE, OAT)]
    for arm in (CE, OAT, *others):
        records = run.chain(arm, key)
        if arm == CE and not run.arm_records(CE, key):  # no cross-entropy arm: only the pre-training
            arm = PRETRAIN
        if records and (arm in (CE, PRETRAIN) or run.arm_records(arm, key)):
            _band(ax, *_by_epoch(records, key), COLOURS.get(arm, "0.6"), NAMES.get(arm, arm))
            drawn += 1
    if not drawn:
        raise Skip(f"no epoch of this run logs '{key}' (a run from before that field was logged)")
    _mark_oat_start(ax, run)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


def _mark_oat_start(ax, run: Run) -> None:
    """A dashed line at the end of the pre-training, where OAT (or another arm) branches off."""
    if any(r["arm"] not in (PRETRAIN, CE) for r in run.records):
        ax.axvline(run.pretrain_epochs, color="0.4", linestyle="--", linewidth=1,
                   label=f"{'OAT' if any(r['arm'] == OAT for r in run.records) else 'the arms'} start "
                         f"(after epoch {run.pretrain_epochs})")


def accuracy_figure(run: Run) -> Figure:
    """Test accuracy over epochs of both arms (the paper's Figs. 2-4), with the paper's figures if any."""
    fig = _figure()
    ax = fig.subplots()
    _draw_arms(ax, run, "test_accuracy")
    paper = run.config["paper"]
    if paper["table"]:
        for arm in (CE, OAT):
            ax.axhline(paper[arm], color=COLOURS[arm], linestyle=":", linewidth=1.5,
                       label=f"paper, {NAMES[arm]}: {paper[arm]:.3f}")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Test accuracy\n{run.subtitle()}")
    ax.legend(loc="lower right")
    return fig


def _anchor_matrix(run: Run, arm: str) -> tuple[np.ndarray, np.ndarray]:
    """The first seed's epoch-mean anchors along an arm's chain as a (C, epochs) matrix, NaN where an epoch
    lacks one, and the epochs it spans."""
    records = [r for r in run.chain(arm, "anchor", whole_pretraining=True) if r["seed"] == run.first_seed]
    epochs = np.arange(records[0]["epoch"], records[-1]["epoch"] + 1)
    matrix = np.full((run.num_classes, len(epochs)), np.nan)
    for r in records:
        matrix[:, r["epoch"] - epochs[0]] = r["anchor"]
    return matrix, epochs


def anchor_heatmap_figure(run: Run) -> Figure:
    """The epoch-mean training anchor, class by epoch, of the first seed: pre-training then OAT, and
    pre-training then cross-entropy (whose anchor is computed the same way, unused by its loss)."""
    arms = [arm for arm in (OAT, CE) if run.arm_records(arm, "anchor")]
    if not arms:
        raise Skip("no epoch of an arm logs its mean anchor (a run from before the 'anchor' field was logged)")
    matrices = [_anchor_matrix(run, arm) for arm in arms]
    low = min(np.nanmin(m) for m, _ in matrices)
    high = max(np.nanmax(m) for m, _ in matrices)
    classes = run.num_classes
    fig = _figure(height=2.2 + (2.2 + min(classes, 40) * 0.08) * len(arms))
    axes = fig.subplots(len(arms), 1, squeeze=False, sharex=True)[:, 0]
    for ax, arm, (matrix, epochs) in zip(axes, arms, matrices):
        image = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=low, vmax=high,
                          extent=(epochs[0] - 0.5, epochs[-1] + 0.5, classes - 0.5, -0.5))
        ax.grid(False)
        if run.pretrain_epochs >= epochs[0]:
            ax.axvline(run.pretrain_epochs + 0.5, color="white", linestyle="--", linewidth=1.5)
        ax.set_ylabel("class")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(classes, 10)))
        ax.set_title(f"pre-training, then {NAMES[arm]} (dashed: {NAMES[arm]} starts)")
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    colourbar = fig.colorbar(image, ax=list(axes), fraction=0.05)
    colourbar.set_label(f"anchor entry (uniform: 1/C = {1 / classes:.3g})")
    fig.suptitle(f"Epoch-mean training anchor, seed {run.first_seed}\n{run.subtitle(seeds=False)}")
    return fig


def anchor_entropy_figure(run: Run) -> Figure:
    """The epoch-mean anchor's entropy over epochs, with its maximum ln C (a uniform anchor)."""
    fig = _figure()
    ax = fig.subplots()
    _draw_arms(ax, run, "anchor_entropy")
    ax.ticklabel_format(axis="y", useOffset=False)  # entropies near ln C: whole numbers, not an offset
    if run.num_classes:
        top = math.log(run.num_classes)
        ax.axhline(top, color="black", linestyle=":", linewidth=1.5, label=f"ln C = {top:.4f} (uniform anchor)")
        bottom = ax.get_ylim()[0]
        ax.set_ylim(bottom, top + 0.05 * (top - bottom))
        # The distance from uniform, ln C - H (the anchor's KL divergence from uniform), read on the right.
        distance = ax.secondary_yaxis("right", functions=(lambda h: top - h, lambda d: top - d))
        distance.set_ylabel("ln C − entropy (KL from uniform)")
    ax.set_ylabel("anchor entropy (nats)")
    ax.set_title(f"Entropy of the epoch-mean training anchor\n{run.subtitle()}")
    ax.legend(loc="best")
    return fig


_MOST_BARS = 20  # classes drawn as grouped bars; more are drawn as lines


def prediction_share_figure(run: Run) -> Figure:
    """Each arm's share of test predictions per class at its last logged epoch."""
    arms = [arm for arm in (CE, OAT) if run.arm_records(arm, "prediction_share")]
    if not arms:
        raise Skip("no epoch logs 'prediction_share' (a run from before that field was logged)")
    fig = _figure()
    ax = fig.subplots()
    for i, arm in enumerate(arms):
        records = run.arm_records(arm, "prediction_share")
        last = [r for r in records if r["epoch"] == records[-1]["epoch"]]
        shares = np.array([r["prediction_share"] for r in last])  # (seeds, C)
        classes = shares.shape[1]
        label = f"{NAMES[arm]}, epoch {last[0]['epoch']}"
        if classes > _MOST_BARS:
            _band(ax, np.arange(classes), list(shares.T), COLOURS[arm], label)
            continue
        mean, width = shares.mean(axis=0), 0.8 / len(arms)
        error = [mean - shares.min(axis=0), shares.max(axis=0) - mean] if len(last) > 1 else None
        ax.bar(np.arange(classes) + (i - (len(arms) - 1) / 2) * width, mean, width, yerr=error,
               color=COLOURS[arm], label=label, error_kw={"elinewidth": 1, "ecolor": "0.2"})
    ax.axhline(1 / classes, color="black", linestyle=":", linewidth=1.5, label=f"1/C = {1 / classes:.3g}")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("share of test predictions")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Test predictions per class at the last epoch\n{run.subtitle()}")
    ax.legend()
    return fig


def _step_points(run: Run, arm: str):
    """The first seed's sampled step anchors of an arm: x = epoch - 1 + step / (the epoch's last sampled
    step, which is its last step), and each anchor's smallest and largest entry."""
    xs, lows, highs = [], [], []
    for r in run.arm_records(arm, "step_anchors"):
        if r["seed"] != run.first_seed or not r["step_anchors"]:
            continue
        steps = max(s["step"] for s in r["step_anchors"])
        for sample in r["step_anchors"]:
            xs.append(r["epoch"] - 1 + sample["step"] / steps)
            lows.append(min(sample["anchor"]))
            highs.append(max(sample["anchor"]))
    return xs, lows, highs


def anchor_range_figure(run: Run) -> Figure:
    """The anchor's smallest and largest entry over epochs (epoch means, and single steps sampled within
    the epochs), and the largest OAT target |onehot(y)/a - 1| per epoch."""
    if not run.arm_records(OAT, "anchor_min") and not run.arm_records(CE, "anchor_min"):
        raise Skip("no epoch logs 'anchor_min' / 'anchor_max'")
    targets = run.arm_records(OAT, "max_target")
    fig = _figure(height=9 if targets else 6)
    axes = fig.subplots(2 if targets else 1, 1, squeeze=False, sharex=True)[:, 0]
    ax = axes[0]
    _plain_values(ax)  # entries near 1/C
    handles = []
    for arm in (PRETRAIN, CE, OAT):
        drawn = False
        for key, style in (("anchor_max", "-"), ("anchor_min", "--")):
            records = run.arm_records(arm, key)
            if records:
                _band(ax, *_by_epoch(records, key), COLOURS[arm], None, linestyle=style)
                drawn = True
        xs, lows, highs = _step_points(run, arm)
        if xs:
            ax.scatter(xs + xs, lows + highs, s=12, color=COLOURS[arm], alpha=0.5, marker="x")
        if drawn or xs:
            handles.append(Patch(color=COLOURS[arm], label=NAMES[arm]))
    handles += [Line2D([], [], color="0.2", label="epoch-mean anchor: max"),
                Line2D([], [], color="0.2", linestyle="--", label="epoch-mean anchor: min"),
                Line2D([], [], color="0.2", marker="x", linestyle="", alpha=0.6,
                       label=f"single steps' anchor: min, max (seed {run.first_seed})")]
    if run.num_classes:
        handles.append(ax.axhline(1 / run.num_classes, color="black", linestyle=":", linewidth=1.5,
                                  label=f"1/C = {1 / run.num_classes:.3g}"))
    ax.set_ylabel("anchor entry")
    ax.set_title(f"Smallest and largest entry of the training anchor\n{run.subtitle()}")
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=9)
    if targets:
        _max_target_panel(axes[1], targets)
    axes[-1].set_xlabel("epoch")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes:
        _mark_oat_start(ax, run)
    return fig


def _plain_values(ax) -> None:
    """Y tick labels that show the values themselves: values that differ only in their last digits (the released
    anchor's largest targets, 10.07 to 10.12 for C = 10) otherwise get ticks like 0.009 under an offset "+1.007e1"."""
    ax.ticklabel_format(axis="y", style="plain", useOffset=False)


def _max_target_panel(ax, targets: list[dict]) -> None:
    _band(ax, *_by_epoch(targets, "max_target"), COLOURS[OAT], "OAT")
    values = [r["max_target"] for r in targets]
    if max(values) > 10 * min(values):  # spans decades (a diverging paper-variant anchor): log scale
        ax.set_yscale("log")
    else:
        _plain_values(ax)
    ax.set_ylabel("largest |target|")
    ax.set_title("Largest OAT target |onehot(y) / a − 1| of each epoch")


def _batch_size_results(run: Run, sizes, evaluate: bool) -> dict:
    """The sweep's results: evaluated (or reused) with ``evaluate``, else only as saved by an earlier call."""
    if evaluate:
        from oat_jax import data, eval_batch_sizes  # imports JAX: only when evaluating
        try:
            return eval_batch_sizes.evaluate_batch_sizes(run.workdir, sizes)
        except (eval_batch_sizes.NoCheckpoint, data.DatasetError) as e:
            raise Skip(str(e)) from None
    path = os.path.join(run.workdir, RESULTS_FILE)
    try:
        return read_json(run.workdir, RESULTS_FILE,
                         f"{path} does not exist yet (run without --no-eval to evaluate the checkpoints)")
    except WorkdirError as e:
        raise Skip(str(e)) from None


def eval_batch_size_figure(run: Run, results: dict, sizes) -> Figure:
    """OAT's test accuracy against the test batch size whose anchor decodes it, and the cross-entropy
    arm's (independent of the batch) as a line."""
    total = results["test_samples"]
    points = {}  # effective batch size -> accuracies per seed; a batch beyond the test set is all of it
    for size in sizes:
        if str(size) in results[OAT]:
            points[min(size or total, total)] = np.array(results[OAT][str(size)])
    if not points:
        raise Skip(f"{RESULTS_FILE} holds none of the batch sizes {', '.join(map(str, sizes))}")
    x = sorted(points)
    fig = _figure()
    ax = fig.subplots()
    epochs = results["checkpoint_epochs"]
    _band(ax, x, [points[s] for s in x], COLOURS[OAT], f"OAT, checkpoint of epoch {epochs[OAT]}")
    if len(results["seeds"]) > 2:  # each seed's own curve: the band hides how each one changes
        for k, seed in enumerate(results["seeds"]):
            ax.plot(x, [points[s][k] for s in x], color=COLOURS[OAT], linewidth=0.8, alpha=0.6, linestyle=":",
                    label="OAT, single seeds" if k == 0 else None)
    if results.get(CE):
        ce = np.array(results[CE])
        ax.axhline(ce.mean(), color=COLOURS[CE], label=f"cross-entropy, checkpoint of epoch {epochs[CE]}")
        if len(ce) > 1:
            ax.axhspan(ce.min(), ce.max(), color=COLOURS[CE], alpha=0.15, linewidth=0)
    trained = run.config["eval_batch_size"]
    if trained:
        ax.axvline(min(trained, total), color="0.4", linestyle="--", linewidth=1,
                   label=f"test batch during training ({trained})")
    ax.set_xscale("log")
    ax.set_xticks(x, [str(s) if s < total else f"all\n({total})" for s in x])
    ax.minorticks_off()
    ax.set_xlabel("test batch size (each batch decoded with its own anchor)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Test accuracy against the test batch size\n{run.subtitle()}")
    ax.legend()
    return fig


def anchor_prior_figure(run: Run) -> Figure:
    """On an imbalanced training set: OAT's epoch-mean anchor beside the training prior π, per class (left:
    its first, middle and last epochs of the first seed, with π and softmax(π), the anchor that ``oat_prior`` fixes),
    and each arm's correlation of anchor and prior over epochs (right)."""
    records = [r for r in run.records if r.get("train_prior")]
    if not records:
        raise Skip("the training set is balanced: its prior is uniform (train_imbalance = 1)")
    prior = np.array(records[0]["train_prior"])
    fig = _figure(4.5)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    classes = np.arange(len(prior))
    left.bar(classes, prior, color="0.85", label="training prior π")
    arm = OAT if any(r["arm"] == OAT for r in records) else records[-1]["arm"]
    own = sorted((r for r in records if r["arm"] == arm and r["seed"] == records[0]["seed"]), key=lambda r: r["epoch"])
    picks = {own[0]["epoch"]: own[0], own[len(own) // 2]["epoch"]: own[len(own) // 2], own[-1]["epoch"]: own[-1]}
    for shade, (epoch, record) in zip((0.3, 0.6, 1.0), picks.items()):
        left.plot(classes, record["anchor"], "o-", color=COLOURS.get(arm, "C1"), alpha=shade, markersize=4,
                  label=f"{NAMES.get(arm, arm)} mean anchor, epoch {epoch}")
    # Drawn over the anchors, which can lie on it: the released anchor is softmax of the mean softmax output.
    softmax = np.exp(prior) / np.exp(prior).sum()
    left.plot(classes, softmax, "k--", linewidth=1.2, zorder=4, label="softmax(π) (oat_prior's anchor)")
    left.axhline(1 / len(prior), color="0.5", linewidth=0.8, linestyle=":", label="uniform 1/C")
    left.set_xticks(classes)
    left.set_xlabel("class (label order: most to least frequent)")
    left.set_ylabel("probability")
    left.legend(fontsize=8)
    for number, name in enumerate(dict.fromkeys(r["arm"] for r in records)):
        x, values = _by_epoch([r for r in records if r["arm"] == name], "anchor_prior_correlation")
        _band(right, x, values, COLOURS.get(name, f"C{number}"), NAMES.get(name, name))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("epoch")
    right.set_ylabel("correlation of mean anchor and π")
    right.legend(fontsize=8)
    fig.suptitle(f"The anchor against the training prior — {run.subtitle()}")
    return fig


FIGURES = (("accuracy.png", accuracy_figure), ("anchor_heatmap.png", anchor_heatmap_figure),
           ("anchor_entropy.png", anchor_entropy_figure), ("prediction_share.png", prediction_share_figure),
           ("anchor_range.png", anchor_range_figure), ("anchor_prior.png", anchor_prior_figure))


def _save(fig: Figure, path: str) -> None:
    """Writes the PNG atomically: a viewer refreshing it never reads half a file."""
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _draw(name: str, draw, out_dir: str) -> str | None:
    """Draws and saves one figure; a figure without data is skipped with a note."""
    with matplotlib.rc_context(_STYLE):
        try:
            fig = draw()
        except Skip as e:
            _note(f"{name} skipped: {e}")
            return None
        path = os.path.join(out_dir, name)
        _save(fig, path)
    return path


def write_plots(workdir: str, out_dir: str | None = None, sizes=DEFAULT_SIZES, evaluate: bool = True) -> list[str]:
    """Writes the run's figures (PNG) to ``out_dir`` (default ``<workdir>/plots``); returns their paths.
    Raises WorkdirError when ``workdir`` holds no run."""
    run = load_run(workdir)
    out_dir = out_dir or os.path.join(workdir, "plots")
    problem = unwritable(out_dir)
    if problem:
        raise WorkdirError(f"cannot write the figures to {out_dir}: {problem}")
    written = [_draw(name, lambda draw=draw: draw(run), out_dir) for name, draw in FIGURES]

    def batch_sizes():
        return eval_batch_size_figure(run, _batch_size_results(run, sizes, evaluate), sizes)

    written.append(_draw("eval_batch_size.png", batch_sizes, out_dir))
    return [path for path in written if path]


def comparison_figure(groups: list[tuple[str, list]], score: str = "final-epoch test accuracy") -> Figure:
    """A panel per report row: each paired comparison (``report.paired_results``: arm, reference, statistics,
    per-seed differences) as its seeds' differences (dots), their mean and its 95 % t interval (bar), against
    no difference (zero); ``score`` names what the differences are of."""
    heights = [len(results) for _, results in groups]
    fig = Figure(layout="constrained", figsize=(8, 1.2 + 0.45 * sum(heights) + 0.6 * len(groups)))
    axes = fig.subplots(len(groups), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    for ax, (title, results) in zip(axes, groups):
        for row, (arm, reference, stats, differences) in enumerate(results):
            y = len(results) - 1 - row  # the first comparison on top
            colour = COLOURS.get(arm, "0.4")
            ax.scatter(differences, [y] * len(differences), s=18, color=colour, alpha=0.45, zorder=2)
            low, high = stats["ci95"] or (stats["mean_difference"],) * 2
            ax.errorbar(stats["mean_difference"], y, xerr=[[stats["mean_difference"] - low],
                                                           [high - stats["mean_difference"]]],
                        fmt="D", color=colour, markeredgecolor="black", capsize=4, zorder=3)
            p_value = "" if stats["p_value"] is None else f", p {stats['p_value']:.2g}"
            ax.annotate(f"{stats['mean_difference']:+.2f}{p_value}, wins {stats['wins']} of {stats['seeds']}",
                        (1.01, y), xycoords=("axes fraction", "data"), va="center", fontsize=9)
        ax.axvline(0, color="0.3", linewidth=1)
        ax.set_yticks(range(len(results)), [f"{arm} − {reference}" for arm, reference, *_ in reversed(results)])
        ax.set_ylim(-0.6, len(results) - 0.4)
        ax.set_title(title)
    axes[-1].set_xlabel(f"difference in {score} (percentage points), paired by seed:\n"
                        "dots: seeds; diamond and bar: mean and 95 % t interval")
    return fig


def write_comparison_figure(groups: list[tuple[str, list]], path: str, score: str) -> bool:
    """Writes ``comparison_figure`` to ``path``; with nothing to compare, a note and no file."""
    if not groups:
        _note(f"{path} not written: no row has two arms that share a seed")
        return False
    with matplotlib.rc_context(_STYLE):
        _save(comparison_figure(groups, score), path)
    return True


_CURVES_ZOOM = 5.0  # points below the best mean that the curves' panels show


def curves_figure(panels: list[tuple[str, dict]], pretrain_epochs: int | None = None) -> Figure:
    """A panel per score (name, arm -> seed -> epoch -> value, ``report.epoch_histories``): each arm's mean over
    its seeds by epoch, with their range as a band; a dashed line where the arms branch off the pre-training.
    Each panel shows the few points below its best mean, where the arms differ; early epochs fall below it."""
    fig = _figure(4.5)
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    for ax, (name, histories) in zip(axes, panels):
        best = -np.inf
        for number, (arm, seeds) in enumerate(histories.items()):
            epochs = sorted({epoch for history in seeds.values() for epoch in history})
            values = [np.array([history[e] for history in seeds.values() if e in history]) for e in epochs]
            _band(ax, np.array(epochs), values, COLOURS.get(arm, f"C{number}"), NAMES.get(arm, arm), linewidth=1.2)
            best = max(best, max(float(v.mean()) for v in values))
        ax.set_ylim(best - _CURVES_ZOOM, best + 0.5)
        if pretrain_epochs:
            ax.axvline(pretrain_epochs, color="0.4", linestyle="--", linewidth=1)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(name)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3)
    fig.suptitle(f"By epoch: the mean over seeds, their range as a band; the {_CURVES_ZOOM:g} points below the best"
                 + (f"\nthe arms start after epoch {pretrain_epochs} (dashed)" if pretrain_epochs else ""))
    return fig


def write_curves_figure(panels: list[tuple[str, dict]], path: str, pretrain_epochs: int | None = None) -> None:
    with matplotlib.rc_context(_STYLE):
        _save(curves_figure(panels, pretrain_epochs), path)


_SWEEP_ZOOM = 6.0  # points below the best score that the zoomed panel shows


def sweep_figure(selection: dict) -> Figure:
    """A sweep's score against the learning rate (log scale), one line per arm: the mean over each point's
    seeds, a cross where a point diverged, the arm's choice ringed. Where a point collapsed far below the
    others, a second panel shows the top few points, where the choices are made."""
    score = selection.get("score", "validation accuracy")
    values = [p["validation_accuracy"] for choice in selection["arms"].values() for p in choice["points"]
              if not p["diverged"]]
    lowest, best = min(values, default=0.0), max(values, default=0.0)
    fig = _figure(4.5)
    panels = fig.subplots(1, 2, width_ratios=(3, 2)) if best - lowest > 2 * _SWEEP_ZOOM else [fig.add_subplot()]
    for ax in panels:
        for number, (arm, choice) in enumerate(selection["arms"].items()):
            _sweep_line(ax, arm, choice, COLOURS.get(arm, f"C{number}"), lowest)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (both phases)")
    panels[0].set_ylabel(f"{score} (%) at the selected epoch")
    panels[0].legend()
    if len(panels) > 1:
        panels[1].set_ylim(best - _SWEEP_ZOOM, best + 0.5)
        panels[1].set_title(f"zoomed: the {_SWEEP_ZOOM:g} percentage points below the best", fontsize=10)
    fig.suptitle("The sweep: each arm's choice ringed; × = diverged (drawn at the lowest score)")
    return fig


def _sweep_line(ax, arm: str, choice: dict, colour, lowest: float) -> None:
    by_rate: dict[float, list] = {}
    for point in choice["points"]:
        by_rate.setdefault(point["setting"]["learning_rate"], []).append(point)
    rates = sorted(by_rate)
    good = [rate for rate in rates if not any(p["diverged"] for p in by_rate[rate])]
    means = [float(np.mean([p["validation_accuracy"] for p in by_rate[rate]])) for rate in good]
    ax.plot(good, means, "o-", color=colour, label=NAMES.get(arm, arm))
    bad = [rate for rate in rates if rate not in good]
    ax.plot(bad, [lowest] * len(bad), "x", color=colour, markersize=9, mew=2)
    if choice["chosen"] is not None and choice["chosen"].get("learning_rate") in good:
        rate = choice["chosen"]["learning_rate"]
        ax.plot([rate], [means[good.index(rate)]], "o", ms=14, mfc="none", mec=colour, mew=1.5)


def write_sweep_figure(selection: dict, path: str) -> None:
    with matplotlib.rc_context(_STYLE):
        _save(sweep_figure(selection), path)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got '{text}'")
    return sizes


def main(argv: list[str]) -> int:
    """``python -m oat_jax.report plots <workdir> [--out-dir DIR] [--batch-sizes 1,8,32,128,0] [--no-eval]``"""
    parser = argparse.ArgumentParser(prog="python -m oat_jax.report plots",
                                     description="PNG figures of one oat_jax run: test accuracy, anchors, "
                                                 "OAT's accuracy against the test batch size.")
    parser.add_argument("workdir", help="the workdir of a python -m oat_jax.main run (finished or running)")
    parser.add_argument("--out-dir", metavar="DIR", help="where the PNG files go (default: <workdir>/plots)")
    parser.add_argument("--batch-sizes", type=_sizes, default=",".join(map(str, DEFAULT_SIZES)), metavar="N,N,...",
                        help="test batch sizes at which OAT's checkpoint is evaluated; 0 = the whole test set "
                             "(default: %(default)s)")
    parser.add_argument("--no-eval", action="store_true",
                        help=f"evaluate nothing: the batch-size figure only from an earlier {RESULTS_FILE}")
    args = parser.parse_args(argv)
    try:
        for path in write_plots(args.workdir, args.out_dir, args.batch_sizes, evaluate=not args.no_eval):
            print(path)
    except WorkdirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
