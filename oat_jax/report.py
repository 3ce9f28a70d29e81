"""``python -m oat_jax.report <workdir>...``: the finished (or running) experiments' test accuracies in the
paper's layout, a Markdown table per paper table with the paper's figures beside ours.

Runs of one cell (several workdirs, or several seeds in one) are pooled into one row when their configs
match apart from the seeds and cosmetic fields (``workdir.identity``), and never count a seed twice: ours is
the mean ± standard deviation of the final test accuracy over the row's seeds. A run that fits no row of its
cell gets a row of its own, noting how it differs. A run that is not the paper's protocol in full (a sample
limit, stand-in data, fewer or unfinished epochs) is flagged in the notes column, so that it is not read as a
result; an arm of another objective than cross-entropy and OAT is listed there too. A folder without a
readable summary.json and config.json is skipped with a note. ``--figure`` draws the paired comparisons, seed
by seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass, field

from oat_jax import paired
from oat_jax import workdir as workdir_lib
from oat_jax.paired import paired_comparison
from oat_jax.names import CE, DECODES, OAT, PRETRAIN
from oat_jax.paper_figures import TABLE_ORDER
from oat_jax.workdir import WorkdirError

_OTHER = "Runs outside the paper's tables"


@dataclass
class Cell:
    """A row of the report: runs of one (table, setting) and one config apart from the seeds and the arms, no
    arm's seed twice; the paper's figures and our per-seed final accuracies."""
    table: str
    setting: str
    paper: dict | None
    identity: dict  # the config fields that decide the results (_identity)
    seeds: set[str] = field(default_factory=set)
    accuracies: dict[str, dict[str, float]] = field(default_factory=dict)  # per arm, {seed: final accuracy}
    decodings: dict[str, dict[str, dict]] = field(default_factory=dict)  # per arm, {seed: {decoding: accuracy}}
    notes: list[str] = field(default_factory=list)
    selected_epochs: dict[str, dict[str, int]] = field(default_factory=dict)  # per arm, {seed: epoch}, where any
    by_frequency: dict[str, dict[str, dict]] = field(default_factory=dict)  # per arm, {seed: {group: accuracy}}
    label: str = ""  # the setting, plus what sets the row apart from its cell's first (tables without notes)


def _run_notes(summary: dict, config: dict) -> list[str]:
    """Why a run is not the paper's protocol in full, if it is not."""
    notes = []
    source = summary.get("dataset", {}).get("source", "")
    if "synthetic" in source or "stand-in" in source:
        notes.append("stand-in data, not a result")
    if config["train_limit"] or config["test_limit"]:
        dataset = summary.get("dataset", {})
        notes.append(f"subset: {dataset.get('train_samples')} train / {dataset.get('test_samples')} test")
    epochs, pretrain_epochs = _protocol(summary.get("paper"))
    if config["num_epochs"] < epochs:
        notes.append(f"{config['num_epochs']} of {epochs} epochs")
    if config["pretrain_epochs"] < pretrain_epochs and config["arms"] != CE:  # CE alone: nothing branches
        notes.append(f"{config['pretrain_epochs']} of {pretrain_epochs} pre-training epochs")
    for arm, result in summary.get("arms", {}).items():
        if result.get("diverged"):
            notes += [f"{arm} diverged at epoch {where['epoch']}" + (f" (seed {seed})" if len(result["diverged"]) > 1
                                                                     or result["seeds"] else "")
                      for seed, where in result["diverged"].items()]
        elif result["final_epoch"] < config["num_epochs"]:
            notes.append(f"{arm} at epoch {result['final_epoch']} of {config['num_epochs']}")
    if config["pretrained_weights"] == "" and config["normalisation"] == "imagenet":
        notes.append("no pretrained weights")
    return notes


def _protocol(paper: dict | None) -> tuple[int, int]:
    """The paper's epochs and pre-training epochs for a cell: base_config()'s (Sec. 3.4), but a Table 3 cell
    ("5 pre-training epochs") varies the pre-training."""
    from oat_jax.config_schema import base_config  # imports JAX: only when a run is reported
    defaults = base_config()
    if paper and paper["table"] == "Table 3":
        return defaults["num_epochs"], int(paper["setting"].split()[0])
    return defaults["num_epochs"], defaults["pretrain_epochs"]


def _identity(config: dict, tuned: tuple[str, ...] = ()) -> dict:
    """The fields that decide a run's results (``workdir.identity``) but the seeds, the arms (each arm branches
    alone from the same pre-training, so a run of other arms adds to the same row), the paper's figures
    (the cell's, already its key) and the fields a sweep tuned per arm (``tuned``)."""
    return {k: v for k, v in workdir_lib.identity(config).items()
            if k not in ("seed", "num_seeds", "paper", "arms", *tuned)}


def _arm_seeds(accuracies: dict[str, dict[str, float]]) -> set[tuple[str, str]]:
    return {(arm, seed) for arm, per_seed in accuracies.items() for seed in per_seed}


@dataclass
class Run:
    """One workdir: its summary and config, and each arm's final test accuracy per seed."""
    name: str
    summary: dict
    config: dict  # its config.json
    accuracies: dict[str, dict[str, float]]
    decodings: dict[str, dict[str, dict]]  # per arm, {seed: the final epoch's accuracy by decoding}, where logged
    selected_epochs: dict[str, dict[str, int]] = field(default_factory=dict)  # per arm, {seed: validation's epoch}
    path: str = ""  # the workdir
    by_frequency: dict[str, dict[str, dict]] = field(default_factory=dict)  # _frequency_figures

    @property
    def seeds(self) -> set[str]:
        return {seed for per_seed in self.accuracies.values() for seed in per_seed}


def run_rule(workdir: str) -> str:
    """The selection rule a run supports best: the validation-selected epoch where it has a validation split."""
    summary = workdir_lib.read_summary(workdir)
    return workdir_lib.selection_rule(*(result.get("seeds", {}) for result in summary.get("arms", {}).values()))


def load_run(workdir: str, select: str = workdir_lib.SELECT_FINAL, metric: str = "") -> Run:
    """The run in ``workdir``, each seed's accuracy (or ``metric``: "balanced", "few") read under the rule
    ``select`` (the final epoch, or the validation-selected one); WorkdirError saying why it cannot be
    reported."""
    if not os.path.isdir(workdir):
        raise WorkdirError("not a folder")
    summary, config = workdir_lib.read_summary(workdir), workdir_lib.read_config(workdir)
    if select == workdir_lib.SELECT_VALIDATION and run_rule(workdir) != select:
        raise WorkdirError("it has no validation split to select an epoch on; report it with --select final")
    try:
        accuracies = {arm: {seed: float(value) for seed, value in workdir_lib.scores(result["seeds"], select,
                                                                                     metric).items()}
                      for arm, result in summary.get("arms", {}).items()}
        if not any(accuracies.values()) and any(result["seeds"] for result in summary.get("arms", {}).values()):
            raise KeyError(select)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise WorkdirError("summary.json is not an oat_jax summary (no per-seed final accuracies)") from None
    decodings = {arm: {seed: per_seed["final_test_accuracy_by_decode"] for seed, per_seed in result["seeds"].items()
                       if "final_test_accuracy_by_decode" in per_seed}
                 for arm, result in summary.get("arms", {}).items()}
    selected = {arm: {seed: per_seed["selected_epoch"] for seed, per_seed in result["seeds"].items()
                      if "selected_epoch" in per_seed} for arm, result in summary.get("arms", {}).items()}
    return Run(os.path.basename(os.path.normpath(workdir)), summary, config, accuracies, decodings, selected, workdir,
               _frequency_figures(workdir, config, accuracies, selected if select == workdir_lib.SELECT_VALIDATION
                                  else None))


# The long-tail benchmarks' breakdown: the classes grouped by training frequency (``longtail.frequency_groups``).
FREQUENCY_FIELDS = (("many", "test_accuracy_many"), ("medium", "test_accuracy_medium"),
                    ("few", "test_accuracy_few"), ("all (balanced)", "test_balanced_accuracy"))


def _frequency_figures(workdir: str, config: dict, accuracies: dict, selected: dict | None) -> dict:
    """On an imbalanced training set, per arm {seed: {group: test accuracy}} over the thirds of the classes by
    training frequency and over all of them, at each seed's ``selected`` epoch (None: its last), read from
    metrics.jsonl; {} on a balanced one, where the thirds are arbitrary."""
    if config.get("train_imbalance", 1) <= 1:
        return {}
    records = workdir_lib.read_records(os.path.join(workdir, workdir_lib.METRICS_FILE))
    figures = {}
    for arm, per_seed in accuracies.items():
        phases = (arm, PRETRAIN) if arm == CE else (arm,)  # CE's epochs continue the pre-training's
        for seed in per_seed:
            history = {r["epoch"]: r for r in records if r["arm"] in phases and str(r["seed"]) == seed}
            record = history.get(selected[arm][seed] if selected else max(history, default=0), {})
            figures.setdefault(arm, {})[seed] = {group: record[key] for group, key in FREQUENCY_FIELDS
                                                 if record.get(key) is not None}
    return figures


def load_runs(workdirs: list[str], select: str = workdir_lib.SELECT_FINAL,
              metric: str = "") -> tuple[list[Run], list[str]]:
    """The reportable runs, and for each other workdir a line saying why it is skipped."""
    runs, skipped = [], []
    for workdir in workdirs:
        try:
            runs.append(load_run(workdir, select, metric))
        except WorkdirError as e:
            skipped.append(f"{workdir}: {e}")
    return runs, skipped


def _new_row_note(cell_rows: list[Cell], run: Run, tuned: tuple[str, ...] = ()) -> str:
    """Why a run fits none of its cell's rows: another config than the first row's, or a seed already
    counted in each row of its own config."""
    identity = _identity(run.config, tuned)
    same = [row for row in cell_rows if row.identity == identity]
    if same:
        repeated = set.union(*(_arm_seeds(row.accuracies) for row in same)) & _arm_seeds(run.accuracies)
        return f"repeats seed {', '.join(sorted({seed for _, seed in repeated}, key=int))}"
    first = cell_rows[0].identity
    changed = [f"{k}={identity.get(k)!r}" for k in sorted(set(first) | set(identity))
               if first.get(k) != identity.get(k)]
    return "differs: " + ", ".join(changed)


def collect(runs: list[Run], tuned: tuple[str, ...] = ()) -> list[Cell]:
    """The report's rows: each run joins the first row of its (table, setting) with the same config apart
    from the seeds, the arms and the ``tuned`` fields, and none of its arms' seeds, else starts a row of its
    own beneath the cell's others."""
    rows: list[Cell] = []
    for run in runs:
        paper = run.summary.get("paper")
        if paper:
            key = (paper["table"], paper["setting"])
        else:
            key = (_OTHER, f"{run.config['dataset']}, {run.config['model']}")
        cell_rows = [row for row in rows if (row.table, row.setting) == key]
        identity = _identity(run.config, tuned)
        row = next((r for r in cell_rows if r.identity == identity
                    and not _arm_seeds(r.accuracies) & _arm_seeds(run.accuracies)), None)
        if row is None:
            row = Cell(key[0], key[1], paper, identity, label=key[1])
            if cell_rows:
                row.notes.append(_new_row_note(cell_rows, run, tuned))
                row.label = f"{key[1]} ({row.notes[-1].removeprefix('differs: ')})"
                rows.insert(rows.index(cell_rows[-1]) + 1, row)
            else:
                rows.append(row)
        row.seeds |= run.seeds
        for arm, per_seed in run.accuracies.items():
            row.accuracies.setdefault(arm, {}).update(per_seed)
            row.decodings.setdefault(arm, {}).update(run.decodings.get(arm, {}))
            row.selected_epochs.setdefault(arm, {}).update(run.selected_epochs.get(arm, {}))
            row.by_frequency.setdefault(arm, {}).update(run.by_frequency.get(arm, {}))
        row.notes += [f"{run.name}: {note}" for note in _run_notes(run.summary, run.config)]
    return rows


def _ours(per_seed: dict[str, float], row_seeds: int = 0) -> str:
    """Mean ± standard deviation over the seeds, and how many seeds when fewer than the row's ``row_seeds``."""
    values = list(per_seed.values())
    if not values:
        return "–"
    text = (f"{values[0]:.3f}" if len(values) == 1
            else f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}")
    return text + (f" ({len(values)} of {row_seeds} seeds)" if len(values) < row_seeds else "")


def _table_rank(table: str) -> int:
    return TABLE_ORDER.index(table) if table in TABLE_ORDER else len(TABLE_ORDER)


# Each --metric's name: in a few words, and in full.
_METRIC_NAMES = {"": ("test accuracy", "test accuracy"),
                 "balanced": ("balanced test accuracy", "balanced test accuracy (the mean of the classes' accuracies)"),
                 "few": ("few-third test accuracy",
                         "test accuracy of the least frequent third of the training classes")}


@dataclass
class Comparing:
    """How the report compares: the selection rule of each seed's score, the contrasts whose p-values form
    Holm's family (None: all of a row's comparisons), and the equivalence margin in points."""
    select: str = workdir_lib.SELECT_FINAL
    contrasts: list[tuple[str, str]] | None = None
    margin: float = 0.3
    metric: str = ""  # "" = test accuracy; "balanced" or "few" (``workdir.METRICS``)

    def _score(self, brief: bool) -> str:
        """The score: in full for the report's text, in a few words (``brief``) for a figure's axis."""
        what = _METRIC_NAMES[self.metric][0 if brief else 1]
        if self.select != workdir_lib.SELECT_VALIDATION:
            return f"final-epoch {what}"
        return f"{what} at the validation-selected epoch" + ("" if brief else (
            " (each seed's epoch of highest validation accuracy, balanced where the training set is imbalanced)"))

    score = property(lambda self: self._score(brief=False))
    score_in_brief = property(lambda self: self._score(brief=True))


def format_markdown(cells: list[Cell], comparing: Comparing = Comparing()) -> str:
    """A Markdown section per table: setting, the paper's and our accuracy without and with OAT, seeds; the
    accuracy of an arm of another objective in the notes."""
    lines = ["# Test accuracy (%): the paper and this implementation", "",
             f"Ours: {comparing.score}, mean ± standard deviation over seeds where there are several."]
    for table in sorted({c.table for c in cells}, key=_table_rank):
        lines += ["", f"## {table}", "",
                  "| setting | w/o OAT, paper | w/o OAT, ours | OAT, paper | OAT, ours | seeds | notes |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for cell in (c for c in cells if c.table == table):
            paper_ce, paper_oat = ((f"{cell.paper[CE]:.3f}", f"{cell.paper[OAT]:.3f}") if cell.paper
                                   else ("–", "–"))
            ce, oat = (_ours(cell.accuracies.get(arm, {}), len(cell.seeds)) for arm in (CE, OAT))
            notes = [f"{arm}: {_ours(values, len(cell.seeds))}" for arm, values in cell.accuracies.items()
                     if arm not in (CE, OAT)]  # an arm of another objective: not in the paper's tables
            lines.append(f"| {cell.setting} | {paper_ce} | {ce} | {paper_oat} | {oat} | {len(cell.seeds)} | "
                         f"{'; '.join(notes + cell.notes)} |")
        lines += _comparisons([c for c in cells if c.table == table], comparing)
        lines += _decodings([c for c in cells if c.table == table])
        lines += _by_frequency([c for c in cells if c.table == table], comparing.select)
    return "\n".join(lines) + "\n"


def _decodings(cells: list[Cell]) -> list[str]:
    """The final epoch's accuracy of each arm by decoding (README, "OAT in your own Flax training loop"), mean ±
    standard deviation over the seeds, for the rows whose every seed logged them."""
    rows = []
    for cell in cells:
        for arm, per_seed in cell.decodings.items():
            if not per_seed or set(per_seed) != set(cell.accuracies.get(arm, {})):
                continue
            values = [_ours({seed: d[name] for seed, d in per_seed.items()}) for name in DECODES]
            rows.append(f"| {cell.label} | {arm} | " + " | ".join(values) + " |")
    if not rows:
        return []
    return ["", "The final epoch's test accuracy (of all test images, whatever the score above) decoded four ways: "
                "with the test batch's anchor, each sample's own, the epoch's mean training anchor, and the uniform "
                "anchor (argmax):", "",
            f"| setting | arm | {' | '.join(DECODES)} |", "| --- | --- |" + " ---: |" * len(DECODES),
            *rows]


def _by_frequency(cells: list[Cell], select: str) -> list[str]:
    """On an imbalanced training set, the long-tail benchmarks' breakdown: each arm's test accuracy over the
    thirds of the classes by training frequency and over all of them, mean ± standard deviation over seeds."""
    rows = [f"| {cell.label} | {arm} | " + " | ".join(
                _ours({seed: groups[group] for seed, groups in per_seed.items() if group in groups})
                for group, _ in FREQUENCY_FIELDS) + f" | {len(per_seed)} |"
            for cell in cells for arm, per_seed in cell.by_frequency.items() if per_seed]
    if not rows:
        return []
    when = "validation-selected" if select == workdir_lib.SELECT_VALIDATION else "final"
    return ["", f"By class frequency: test accuracy at each seed's {when} epoch over the most frequent, middle and "
                "least frequent thirds of the training classes, and over all classes (balanced accuracy):", "",
            "| setting | arm | " + " | ".join(group for group, _ in FREQUENCY_FIELDS) + " | seeds |",
            "| --- | --- |" + " ---: |" * (len(FREQUENCY_FIELDS) + 1), *rows]


# OAT's controls (results/fashion_mnist_study/README.md): each removes one thing from OAT, so OAT minus the
# control, paired by seed, is what that thing is worth.
_CONTROLS = ("oat_uniform", "square", "ce_smooth", "oat_prior", "ce_logit_adjusted")


def _pairs(arms) -> list[tuple[str, str]]:
    return ([(arm, CE) for arm in arms if CE in arms and arm != CE]
            + [(OAT, control) for control in _CONTROLS if OAT in arms and control in arms])


def paired_results(cell: Cell) -> list[tuple[str, str, dict, list[float]]]:
    """A row's comparisons, each arm against cross-entropy and then OAT against each of its controls:
    (arm, reference, ``paired_comparison``, the per-seed differences) for the pairs that share seeds."""
    arms = cell.accuracies
    results = []
    for arm, reference in _pairs(arms):
        ours, theirs = arms[arm], arms[reference]
        comparison = paired_comparison(ours, theirs)
        if comparison is not None:
            shared = sorted(set(ours) & set(theirs), key=str)
            results.append((arm, reference, comparison, [ours[seed] - theirs[seed] for seed in shared]))
    return results


def judged_results(cell: Cell, comparing: Comparing) -> list[tuple[str, str, dict, list[float], dict]]:
    """``paired_results`` with each comparison's judgement: Holm-adjusted p-values over the family (the
    contrasts named in ``comparing``, or all of the row's), the equivalence test against the margin, and one
    word (``paired.verdict``); comparisons outside the family are judged "–"."""
    results = paired_results(cell)
    family = [i for i, (arm, reference, _, _) in enumerate(results)
              if comparing.contrasts is None or (arm, reference) in comparing.contrasts]
    equivalence = {i: paired.equivalence_p_value(results[i][3], comparing.margin) for i in family}
    adjusted = dict(zip(family, paired.holm([results[i][2]["p_value"] for i in family])))
    adjusted_equivalence = dict(zip(family, paired.holm([equivalence[i] for i in family])))
    judged = []
    for i, (arm, reference, comparison, differences) in enumerate(results):
        judgement = {"holm_p": adjusted.get(i), "equivalence_p": equivalence.get(i),
                     "verdict": paired.verdict(comparison, adjusted.get(i), adjusted_equivalence.get(i))
                     if i in family else "–"}
        judged.append((arm, reference, comparison, differences, judgement))
    return judged


def _p(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def _comparisons(cells: list[Cell], comparing: Comparing = Comparing()) -> list[str]:
    """Each arm against cross-entropy, and OAT against each of its controls, paired by seed
    (``oat_jax.paired``), for the rows that have both arms: a table row each, named by the arm against
    cross-entropy and by the control against OAT, with its Holm-adjusted p-value and verdict."""
    against_ce, against_controls = [], []
    for cell in cells:
        for arm, reference, comparison, _, judgement in judged_results(cell, comparing):
            interval = ("–" if comparison["ci95"] is None else
                        f"[{comparison['ci95'][0]:+.3f}, {comparison['ci95'][1]:+.3f}]")
            p_value = "no spread" if comparison.get("no_spread") else _p(comparison["p_value"])
            table, label = (against_ce, arm) if reference == CE else (against_controls, reference)
            table.append(f"| {cell.label} | {label} | {comparison['mean_difference']:+.3f} | {interval} | "
                         f"{p_value} | {_p(judgement['holm_p'])} | {_p(judgement['equivalence_p'])} | "
                         f"{comparison['wins']} of {comparison['seeds']} | {judgement['verdict']} |")
    family = ("the contrasts " + ", ".join(f"{arm} − {reference}" for arm, reference in comparing.contrasts)
              if comparing.contrasts else "all of a row's comparisons")
    columns = "| 95 % interval | p | p (Holm) | p (equivalent) | {} | verdict |"
    rule = "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    lines = []
    if against_ce:
        lines += ["", f"Against cross-entropy, paired by seed ({comparing.score}, percentage points; a 95 % t "
                      "interval and a two-sided paired t-test):", "",
                  "| setting | arm | mean difference " + columns.format("wins"), rule, *against_ce]
    if against_controls:
        lines += ["", "OAT against its controls, paired by seed (OAT minus the control; wins are OAT's):", "",
                  "| setting | control | OAT − control " + columns.format("OAT wins"), rule, *against_controls]
    if against_ce or against_controls:
        lines += ["", f"p (Holm): adjusted over {family}. p (equivalent): two one-sided t-tests that the difference "
                      f"lies within ±{comparing.margin:g} points, Holm-adjusted over the same family for the verdict. "
                      "Verdict: better or worse where the adjusted p < 0.05, equivalent where the adjusted "
                      "equivalence p < 0.05, otherwise inconclusive; – for a comparison outside the family. "
                      "\"no spread\": every seed differs by the same amount, so there is nothing to test against."]
    return lines


def _contrasts(text: str | None) -> list[tuple[str, str]] | None:
    """"oat-ce,oat-ce_smooth" -> [("oat", "ce"), ("oat", "ce_smooth")]; ValueError saying how to write it."""
    if not text:
        return None
    pairs = [tuple(part.strip().split("-")) for part in text.split(",")]
    if any(len(pair) != 2 or not all(pair) for pair in pairs):
        raise ValueError(f"--contrasts {text!r}: write each as ARM-REFERENCE, e.g. oat-ce,oat-ce_smooth")
    return pairs


def _default_rule(workdirs: list[str]) -> str:
    """The validation rule where every readable run has a validation split, otherwise the final epoch."""
    rules = set()
    for workdir in workdirs:
        try:
            rules.add(run_rule(workdir))
        except WorkdirError:
            continue
    return workdir_lib.SELECT_VALIDATION if rules == {workdir_lib.SELECT_VALIDATION} else workdir_lib.SELECT_FINAL


def _read_selection(folder: str) -> dict:
    from oat_jax.sweep import SELECTION_FILE
    try:
        with open(os.path.join(folder, SELECTION_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        raise ValueError(f"--sweep {folder}: no readable {SELECTION_FILE} (run python -m oat_jax.sweep there "
                         "first)") from None


def sweep_section(selection: dict, cells: list[Cell]) -> str:
    """The sweep's choices: per arm its chosen setting, the validation accuracy and epoch it was chosen at,
    how many grid points it was given and whether the choice lies at the grid's edge; and the mean epoch
    the confirming seeds selected."""
    score = selection.get("score", "validation accuracy")  # sweeps before the balanced score named none
    lines = ["", "## The sweep's choices", "",
             f"Chosen on {score} only: {selection['rule']}.", "",
             f"| arm | chosen | {score} | its selected epoch | grid points (diverged) | at the edge | "
             "confirming seeds' mean selected epoch |", "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for arm, choice in selection["arms"].items():
        points = choice["points"]
        diverged = sum(point["diverged"] for point in points)
        if choice["chosen"] is None:
            lines.append(f"| {arm} | none: diverged everywhere | – | – | {len(points)} ({diverged}) | – | – |")
            continue
        epochs = [point["selected_epoch"] for point in points if point["setting"] == choice["chosen"]]
        confirmed = [epoch for cell in cells for epoch in cell.selected_epochs.get(arm, {}).values()]
        chosen = ", ".join(f"{field}={value:g}" if isinstance(value, float) else f"{field}={value}"
                           for field, value in choice["chosen"].items())
        lines.append(f"| {arm} | {chosen} | {choice['validation_accuracy']:.2f} | {', '.join(map(str, epochs))} | "
                     f"{len(points)} ({diverged}) | {'yes' if choice['at_edge'] else 'no'} | "
                     + (f"{statistics.fmean(confirmed):.1f} |" if confirmed else "– |"))
    return "\n".join(lines) + "\n"


def epoch_histories(runs: list[Run], key: str = "test_accuracy", whole: bool = False) -> dict:
    """arm -> seed -> epoch -> the ``key`` of that epoch's record, from the runs' metrics.jsonl files. The
    pre-training's epochs count as the cross-entropy arm's, which continues them; with ``whole``, as every arm's
    of that run, since every arm starts from them."""
    by_arm: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        for record in workdir_lib.read_records(os.path.join(run.path, workdir_lib.METRICS_FILE)):
            if record.get(key) is None:
                continue
            arms = [record["arm"]] if record["arm"] != PRETRAIN else list(run.accuracies) if whole else [CE]
            for arm in arms:
                if arm in run.accuracies and str(record["seed"]) in run.accuracies[arm]:
                    by_arm.setdefault(arm, {}).setdefault(str(record["seed"]), {})[record["epoch"]] = record[key]
    return by_arm


def by_epoch_section(runs: list[Run], epochs: list[int]) -> str:
    """Each arm's test accuracy at the given epochs, mean over every seed of the runs that logged it, and the
    range of the seeds' best epochs: how much a ranking depends on when training stops. The best epoch is
    picked by test accuracy, so it is an oracle, shown to read the curves, never to compare."""
    by_arm = epoch_histories(runs)
    lines = ["", "## Test accuracy by epoch", "",
             "Mean over seeds at each epoch; the last column, each seed's epoch of highest test accuracy, is an "
             "oracle (chosen on the test set).", "",
             "| arm | " + " | ".join(f"epoch {epoch}" for epoch in epochs) + " | seeds' best epochs (oracle) |",
             "| --- | " + " | ".join("---:" for _ in epochs) + " | ---: |"]
    for arm, seeds in by_arm.items():
        cells = []
        for epoch in epochs:
            values = [history[epoch] for history in seeds.values() if epoch in history]
            cells.append(f"{statistics.fmean(values):.2f}" if len(values) == len(seeds) else "–")
        best = [max(history, key=lambda e: (history[e], -e)) for history in seeds.values()]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {min(best)}–{max(best)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plots"]:  # python -m oat_jax.report plots <workdir> ...: one run's figures
        from oat_jax import plots  # matplotlib: only imported for plots
        return plots.main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m oat_jax.report",
                                     description="Test accuracies of oat_jax runs beside the paper's figures; "
                                                 "'python -m oat_jax.report plots <workdir>' draws one run's "
                                                 "figures.")
    parser.add_argument("workdirs", nargs="+", help="workdirs of python -m oat_jax.main runs")
    parser.add_argument("--select", choices=(workdir_lib.SELECT_VALIDATION, workdir_lib.SELECT_FINAL),
                        help="each seed's score: at its validation-selected epoch, or at the final one "
                             "(default: validation where every run has a validation split, else final)")
    parser.add_argument("--contrasts", metavar="ARM-REF,...",
                        help="the comparisons of Holm's family, e.g. oat-ce,oat-ce_smooth (default: all of a row's)")
    parser.add_argument("--metric", choices=("accuracy", *workdir_lib.METRICS), default="accuracy",
                        help="each seed's score: test accuracy, balanced accuracy (the mean of the classes'), or "
                             "the least frequent third's accuracy (imbalanced training sets)")
    parser.add_argument("--margin", type=float, default=0.3,
                        help="equivalence margin in accuracy points (default 0.3)")
    parser.add_argument("--sweep", metavar="FOLDER",
                        help="the sweep (python -m oat_jax.sweep) that chose the runs' settings: its choices "
                             "are listed, and its tuned fields may differ between the arms of a row")
    parser.add_argument("--by-epoch", metavar="E1,E2,...",
                        help="also tabulate each arm's mean test accuracy at these epochs (from metrics.jsonl)")
    parser.add_argument("--curves", metavar="PNG",
                        help="also draw each arm's validation and test accuracy by epoch, the mean over seeds and "
                             "their range, from each run's first epoch")
    parser.add_argument("--sweep-figure", metavar="PNG",
                        help="with --sweep: draw validation accuracy against the learning rate, one line per arm")
    parser.add_argument("--out", help="also write the Markdown to this file")
    parser.add_argument("--figure", metavar="PNG",
                        help="also draw the paired comparisons (each seed's difference, the mean and its 95 %% "
                             "interval) to this PNG file")
    args = parser.parse_args(argv)
    try:
        contrasts = _contrasts(args.contrasts)
        selection = _read_selection(args.sweep) if args.sweep else None
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.margin <= 0 or not math.isfinite(args.margin):
        print(f"error: --margin must be a positive number of points, got {args.margin}", file=sys.stderr)
        return 2
    for path in filter(None, (args.out, args.figure, args.sweep_figure, args.curves)):  # before the work, not after it
        problem = workdir_lib.unwritable(os.path.dirname(os.path.abspath(path)))
        if problem:
            print(f"error: cannot write {path}: {problem}", file=sys.stderr)
            return 2
    select = args.select or _default_rule(args.workdirs)
    metric = "" if args.metric == "accuracy" else args.metric
    runs, skipped = load_runs(args.workdirs, select, metric)
    if not runs:  # one line, whatever the number of folders
        print(f"error: nothing to report: {'; '.join(skipped)}", file=sys.stderr)
        return 2
    for line in skipped:  # runs/* may hold an unfinished run: report the others
        print(f"note: skipping {line}", file=sys.stderr)
    cells = collect(runs, tuple(selection["grid"]) if selection else ())
    compared = {pair for cell in cells for pair in _pairs(cell.accuracies)}
    missing = [f"{arm}-{reference}" for arm, reference in contrasts or [] if (arm, reference) not in compared]
    if missing:  # a misspelt contrast would silently leave the family, and Holm would adjust over fewer
        print(f"error: --contrasts {','.join(missing)}: no row of these runs makes that comparison; they compare "
              f"{', '.join(sorted(f'{arm}-{reference}' for arm, reference in compared)) or 'nothing'}",
              file=sys.stderr)
        return 2
    comparing = Comparing(select, contrasts, args.margin, metric)
    text = format_markdown(cells, comparing)
    if args.by_epoch:
        try:
            epochs = [int(epoch) for epoch in args.by_epoch.split(",")]
        except ValueError:
            print(f"error: --by-epoch {args.by_epoch!r}: give epochs as 40,60,80,100", file=sys.stderr)
            return 2
        text += by_epoch_section(runs, epochs)
    if selection:
        text += sweep_section(selection, cells)
        if args.sweep_figure:
            from oat_jax import plots  # matplotlib: only imported for figures
            plots.write_sweep_figure(selection, args.sweep_figure)
            print(f"figure: {args.sweep_figure}", file=sys.stderr)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.curves:
        from oat_jax import plots  # matplotlib: only imported for figures
        panels = [(name, histories) for name, key in (("validation accuracy", "val_accuracy"),
                                                      ("test accuracy", "test_accuracy"))
                  if (histories := epoch_histories(runs, key, whole=True))]
        pretraining = {run.config.get("pretrain_epochs") for run in runs}
        if panels:
            plots.write_curves_figure(panels, args.curves, pretraining.pop() if len(pretraining) == 1 else None)
        print(f"figure: {args.curves}" if panels else f"note: {args.curves} not written: no metrics.jsonl has an "
              "epoch's accuracy", file=sys.stderr)
    if args.figure:
        from oat_jax import plots  # matplotlib: only imported for figures
        groups = [(cell.label if cell.table == _OTHER else f"{cell.table}, {cell.label}", results)
                  for cell in cells if (results := paired_results(cell))]
        if plots.write_comparison_figure(groups, args.figure, comparing.score_in_brief):
            print(f"figure: {args.figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
