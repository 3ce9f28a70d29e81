"""``python -m oat_jax.report <workdir>...``: the finished (or running) experiments' test accuracies in the
paper's layout, a Markdown table per paper table with the paper's figures beside ours.

Runs of one cell (several workdirs, or several seeds in one) are pooled: ours is the mean ± standard
deviation of the final test accuracy over all their seeds. A run that is not the paper's protocol in full
(a sample limit, stand-in data, unfinished epochs) is flagged in the notes column, so that it is not read
as a result.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field

from oat_jax.paper_figures import TABLE_ORDER

_OTHER = "Runs outside the paper's tables"


class ReportError(ValueError):
    """A workdir that cannot be reported; the message names it."""


@dataclass
class Cell:
    """Every run of one (table, setting): the paper's figures and our per-seed final accuracies."""
    table: str
    setting: str
    paper: dict | None
    accuracies: dict[str, list[float]] = field(default_factory=lambda: {"ce": [], "oat": []})
    notes: list[str] = field(default_factory=list)


def read_workdir_json(path: str, question_end: str = "?") -> dict:
    """A JSON file of a workdir; ReportError naming it when missing (asking whether its folder is an
    oat_jax workdir, the question ending with ``question_end``) or unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ReportError(f"{path} is missing: is {os.path.dirname(path)} an oat_jax workdir{question_end}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON ({e})") from None


def _run_notes(summary: dict, config: dict) -> list[str]:
    """Why a run is not the paper's protocol in full, if it is not."""
    notes = []
    source = summary.get("dataset", {}).get("source", "")
    if "synthetic" in source or "stand-in" in source:
        notes.append("stand-in data, not a result")
    if config.get("train_limit") or config.get("test_limit"):
        dataset = summary.get("dataset", {})
        notes.append(f"subset: {dataset.get('train_samples')} train / {dataset.get('test_samples')} test")
    for arm, result in summary.get("arms", {}).items():
        if result["final_epoch"] < config.get("num_epochs", result["final_epoch"]):
            notes.append(f"{arm} at epoch {result['final_epoch']} of {config['num_epochs']}")
    if config.get("pretrained_weights") == "" and config.get("normalisation") == "imagenet":
        notes.append("no pretrained weights")
    return notes


def collect(workdirs: list[str]) -> list[Cell]:
    """One Cell per (table, setting) found in the workdirs' summary.json and config.json."""
    cells: dict[tuple[str, str], Cell] = {}
    for workdir in workdirs:
        finished = " of a finished run? (summary.json is written when a run ends)"
        summary = read_workdir_json(os.path.join(workdir, "summary.json"), finished)
        config = read_workdir_json(os.path.join(workdir, "config.json"), finished)
        paper = summary.get("paper")
        if paper:
            key = (paper["table"], paper["setting"])
        else:
            key = (_OTHER, f"{config.get('dataset')}, {config.get('model')}")
        cell = cells.setdefault(key, Cell(table=key[0], setting=key[1], paper=paper))
        for arm, result in summary.get("arms", {}).items():
            cell.accuracies[arm] += [seed["final_test_accuracy"] for seed in result["seeds"].values()]
        cell.notes += [f"{os.path.basename(os.path.normpath(workdir))}: {note}"
                       for note in _run_notes(summary, config)]
    return list(cells.values())


def _ours(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def _table_rank(table: str) -> int:
    return TABLE_ORDER.index(table) if table in TABLE_ORDER else len(TABLE_ORDER)


def format_markdown(cells: list[Cell]) -> str:
    """A Markdown section per table: setting, the paper's and our accuracy without and with OAT, seeds."""
    lines = ["# Test accuracy (%): the paper and this implementation", "",
             "Ours: final-epoch test accuracy, mean ± standard deviation over seeds where there are several."]
    for table in sorted({c.table for c in cells}, key=_table_rank):
        lines += ["", f"## {table}", "",
                  "| setting | w/o OAT, paper | w/o OAT, ours | OAT, paper | OAT, ours | seeds | notes |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for cell in (c for c in cells if c.table == table):
            paper_ce, paper_oat = (f"{cell.paper['ce']:.3f}", f"{cell.paper['oat']:.3f}") if cell.paper else ("–", "–")
            seeds = max(len(cell.accuracies["ce"]), len(cell.accuracies["oat"]))
            lines.append(f"| {cell.setting} | {paper_ce} | {_ours(cell.accuracies['ce'])} | {paper_oat} | "
                         f"{_ours(cell.accuracies['oat'])} | {seeds} | {'; '.join(cell.notes)} |")
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
    parser.add_argument("--out", help="also write the Markdown to this file")
    args = parser.parse_args(argv)
    try:
        text = format_markdown(collect(args.workdirs))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text, end="")
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
