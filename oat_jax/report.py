"""``python -m oat_jax.report <workdir>...``: the finished (or running) experiments' test accuracies in the
paper's layout, a Markdown table per paper table with the paper's figures beside ours.

Runs of one cell (several workdirs, or several seeds in one) are pooled into one row when their configs
match apart from the seeds and cosmetic fields (``workdir.identity``: an old ``method="both"`` and
``arms="ce,oat"`` are one config), and never count a seed twice: ours is the mean ± standard deviation of
the final test accuracy over the row's seeds. A run that fits no row of its cell gets a row of its own,
noting how it differs. A run that is not the paper's protocol in full (a sample limit, stand-in data, fewer
or unfinished epochs) is flagged in the notes column, so that it is not read as a result; an arm of another
objective than cross-entropy and OAT is listed there too. A folder without a readable summary.json and
config.json is skipped with a note. ``--figure`` draws the paired comparisons, seed by seed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field

from oat_jax import workdir as workdir_lib
from oat_jax.paired import paired_comparison
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
    if config["pretrain_epochs"] < pretrain_epochs and config["arms"] != "ce":  # "ce" alone: nothing branches
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
    defaults = workdir_lib.default_config()
    if paper and paper["table"] == "Table 3":
        return defaults["num_epochs"], int(paper["setting"].split()[0])
    return defaults["num_epochs"], defaults["pretrain_epochs"]


def _identity(config: dict) -> dict:
    """The fields that decide a run's results (``workdir.identity``) but the seeds, the arms (each arm branches
    alone from the same pre-training, so a run of other arms adds to the same row) and the paper's figures
    (the cell's, already its key)."""
    return {k: v for k, v in workdir_lib.identity(config).items()
            if k not in ("seed", "num_seeds", "paper", "arms")}


def _arm_seeds(accuracies: dict[str, dict[str, float]]) -> set[tuple[str, str]]:
    return {(arm, seed) for arm, per_seed in accuracies.items() for seed in per_seed}


@dataclass
class Run:
    """One workdir: its summary and config, and each arm's final test accuracy per seed."""
    name: str
    summary: dict
    config: dict  # complete (workdir.read_config): a field an older run predates had its default then
    accuracies: dict[str, dict[str, float]]
    decodings: dict[str, dict[str, dict]]  # per arm, {seed: the final epoch's accuracy by decoding}, where logged

    @property
    def seeds(self) -> set[str]:
        return {seed for per_seed in self.accuracies.values() for seed in per_seed}


def load_run(workdir: str) -> Run:
    """The run in ``workdir``; WorkdirError saying why it cannot be reported."""
    if not os.path.isdir(workdir):
        raise WorkdirError("not a folder")
    summary, config = workdir_lib.read_summary(workdir), workdir_lib.read_config(workdir)
    try:
        accuracies = {arm: {seed: float(per_seed["final_test_accuracy"]) for seed, per_seed in result["seeds"].items()}
                      for arm, result in summary.get("arms", {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        raise WorkdirError("summary.json is not an oat_jax summary (no per-seed final accuracies)") from None
    decodings = {arm: {seed: per_seed["final_test_accuracy_by_decode"] for seed, per_seed in result["seeds"].items()
                       if "final_test_accuracy_by_decode" in per_seed}
                 for arm, result in summary.get("arms", {}).items()}
    return Run(os.path.basename(os.path.normpath(workdir)), summary, config, accuracies, decodings)


def load_runs(workdirs: list[str]) -> tuple[list[Run], list[str]]:
    """The reportable runs, and for each other workdir a line saying why it is skipped."""
    runs, skipped = [], []
    for workdir in workdirs:
        try:
            runs.append(load_run(workdir))
        except WorkdirError as e:
            skipped.append(f"{workdir}: {e}")
    return runs, skipped


def _new_row_note(cell_rows: list[Cell], run: Run) -> str:
    """Why a run fits none of its cell's rows: another config than the first row's, or a seed already
    counted in each row of its own config."""
    identity = _identity(run.config)
    same = [row for row in cell_rows if row.identity == identity]
    if same:
        repeated = set.union(*(_arm_seeds(row.accuracies) for row in same)) & _arm_seeds(run.accuracies)
        return f"repeats seed {', '.join(sorted({seed for _, seed in repeated}, key=int))}"
    first = cell_rows[0].identity
    changed = [f"{k}={identity.get(k)!r}" for k in sorted(set(first) | set(identity))
               if first.get(k) != identity.get(k)]
    return "differs: " + ", ".join(changed)


def collect(runs: list[Run]) -> list[Cell]:
    """The report's rows: each run joins the first row of its (table, setting) with the same config apart
    from the seeds and arms and none of its arms' seeds, else starts a row of its own beneath the cell's
    others."""
    rows: list[Cell] = []
    for run in runs:
        paper = run.summary.get("paper")
        if paper:
            key = (paper["table"], paper["setting"])
        else:
            key = (_OTHER, f"{run.config['dataset']}, {run.config['model']}")
        cell_rows = [row for row in rows if (row.table, row.setting) == key]
        identity = _identity(run.config)
        row = next((r for r in cell_rows if r.identity == identity
                    and not _arm_seeds(r.accuracies) & _arm_seeds(run.accuracies)), None)
        if row is None:
            row = Cell(key[0], key[1], paper, identity)
            if cell_rows:
                row.notes.append(_new_row_note(cell_rows, run))
                rows.insert(rows.index(cell_rows[-1]) + 1, row)
            else:
                rows.append(row)
        row.seeds |= run.seeds
        for arm, per_seed in run.accuracies.items():
            row.accuracies.setdefault(arm, {}).update(per_seed)
            row.decodings.setdefault(arm, {}).update(run.decodings.get(arm, {}))
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


def format_markdown(cells: list[Cell]) -> str:
    """A Markdown section per table: setting, the paper's and our accuracy without and with OAT, seeds; the
    accuracy of an arm of another objective in the notes."""
    lines = ["# Test accuracy (%): the paper and this implementation", "",
             "Ours: final-epoch test accuracy, mean ± standard deviation over seeds where there are several."]
    for table in sorted({c.table for c in cells}, key=_table_rank):
        lines += ["", f"## {table}", "",
                  "| setting | w/o OAT, paper | w/o OAT, ours | OAT, paper | OAT, ours | seeds | notes |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for cell in (c for c in cells if c.table == table):
            paper_ce, paper_oat = ((f"{cell.paper['ce']:.3f}", f"{cell.paper['oat']:.3f}") if cell.paper
                                   else ("–", "–"))
            ce, oat = (_ours(cell.accuracies.get(arm, {}), len(cell.seeds)) for arm in ("ce", "oat"))
            notes = [f"{arm}: {_ours(values, len(cell.seeds))}" for arm, values in cell.accuracies.items()
                     if arm not in ("ce", "oat")]  # an arm of another objective: not in the paper's tables
            lines.append(f"| {cell.setting} | {paper_ce} | {ce} | {paper_oat} | {oat} | {len(cell.seeds)} | "
                         f"{'; '.join(notes + cell.notes)} |")
        lines += _comparisons([c for c in cells if c.table == table])
        lines += _decodings([c for c in cells if c.table == table])
    return "\n".join(lines) + "\n"


_DECODINGS = ("batch", "single", "train_anchor", "uniform")


def _decodings(cells: list[Cell]) -> list[str]:
    """The final epoch's accuracy of each arm by decoding (README, "Decoding without a test batch"), mean ±
    standard deviation over the seeds, for the rows whose every seed logged them."""
    rows = []
    for cell in cells:
        for arm, per_seed in cell.decodings.items():
            if not per_seed or set(per_seed) != set(cell.accuracies.get(arm, {})):
                continue
            values = [_ours({seed: d[name] for seed, d in per_seed.items()}) for name in _DECODINGS]
            rows.append(f"| {cell.setting} | {arm} | " + " | ".join(values) + " |")
    if not rows:
        return []
    return ["", "The final epoch decoded four ways: with the test batch's anchor, each sample's own, the epoch's "
                "mean training anchor, and the uniform anchor (argmax):", "",
            "| setting | arm | batch | single | train_anchor | uniform |", "| --- | --- | ---: | ---: | ---: | ---: |",
            *rows]


# OAT's controls (README, "Does the anchor matter?"): each removes one thing from OAT, so OAT minus the
# control, paired by seed, is what that thing is worth.
_CONTROLS = ("oat_uniform", "square", "ce_smooth")


def paired_results(cell: Cell) -> list[tuple[str, str, dict, list[float]]]:
    """A row's comparisons, each arm against cross-entropy and then OAT against each of its controls:
    (arm, reference, ``paired_comparison``, the per-seed differences) for the pairs that share seeds."""
    arms = cell.accuracies
    pairs = ([(arm, "ce") for arm in arms if "ce" in arms and arm != "ce"]
             + [("oat", control) for control in _CONTROLS if "oat" in arms and control in arms])
    results = []
    for arm, reference in pairs:
        ours, theirs = arms[arm], arms[reference]
        comparison = paired_comparison(ours, theirs)
        if comparison is not None:
            shared = sorted(set(ours) & set(theirs), key=str)
            results.append((arm, reference, comparison, [ours[seed] - theirs[seed] for seed in shared]))
    return results


def _comparisons(cells: list[Cell]) -> list[str]:
    """Each arm against cross-entropy, and OAT against each of its controls, paired by seed
    (``oat_jax.paired``), for the rows that have both arms: a table row each, named by the arm against
    cross-entropy and by the control against OAT."""
    against_ce, against_controls = [], []
    for cell in cells:
        for arm, reference, comparison, _ in paired_results(cell):
            interval = ("–" if comparison["ci95"] is None else
                        f"[{comparison['ci95'][0]:+.3f}, {comparison['ci95'][1]:+.3f}]")
            p_value = "–" if comparison["p_value"] is None else f"{comparison['p_value']:.3g}"
            table, label = (against_ce, arm) if reference == "ce" else (against_controls, reference)
            table.append(f"| {cell.setting} | {label} | {comparison['mean_difference']:+.3f} | {interval} | "
                         f"{p_value} | {comparison['wins']} of {comparison['seeds']} |")
    lines = []
    if against_ce:
        lines += ["", "Against cross-entropy, paired by seed (final accuracy, percentage points; a 95 % t interval "
                      "and a two-sided paired t-test):", "",
                  "| setting | arm | mean difference | 95 % interval | p | wins |",
                  "| --- | --- | ---: | ---: | ---: | ---: |", *against_ce]
    if against_controls:
        lines += ["", "OAT against its controls, paired by seed (OAT minus the control; wins are OAT's):", "",
                  "| setting | control | OAT − control | 95 % interval | p | OAT wins |",
                  "| --- | --- | ---: | ---: | ---: | ---: |", *against_controls]
    return lines


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
    parser.add_argument("--out", help="also write the Markdown to this file")
    parser.add_argument("--figure", metavar="PNG",
                        help="also draw the paired comparisons (each seed's difference, the mean and its 95 %% "
                             "interval) to this PNG file")
    args = parser.parse_args(argv)
    runs, skipped = load_runs(args.workdirs)
    if not runs:  # one line, whatever the number of folders
        print(f"error: nothing to report: {'; '.join(skipped)}", file=sys.stderr)
        return 2
    for line in skipped:  # runs/* may hold an unfinished run: report the others
        print(f"note: skipping {line}", file=sys.stderr)
    cells = collect(runs)
    text = format_markdown(cells)
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.figure:
        from oat_jax import plots  # matplotlib: only imported for figures
        groups = [(cell.setting if cell.table == _OTHER else f"{cell.table}, {cell.setting}", results)
                  for cell in cells if (results := paired_results(cell))]
        if plots.write_comparison_figure(groups, args.figure):
            print(f"figure: {args.figure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
