"""The READMEs' study figures are the committed reports' figures: every paired comparison in a study's table,
and every "arm mean ± sd" of its summary, in the project README and in each study's own README, matches the
`report.md` that the study's command wrote, to the digits printed. A figure edited by hand, or a report rerun
without its READMEs, fails here."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
NUMBER = r"[+\-−]?\d+(?:\.\d+)?(?:e-\d+)?"
# A README name for an arm: "OAT", "CE", "cross-entropy" or a backticked arm name.
ARM_NAMES = {"oat": "oat", "ce": "ce", "cross-entropy": "ce"}
MEAN_SD = re.compile(r"(cross-entropy|OAT|`\w+`) (\d+\.\d+) ± (\d+\.\d+)")


def number(text: str) -> float:
    return float(text.replace("−", "-"))


def agrees(printed: str, exact: float) -> bool:
    """Whether ``printed`` is ``exact`` rounded to the digits printed (half a unit of its last digit)."""
    mantissa = printed.replace("−", "-").lstrip("+-").split("e")[0]
    decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
    return abs(number(printed) - exact) <= 0.5 * 10 ** -decimals + 1e-9


def arm(name: str) -> str:
    name = name.strip().strip("`")
    return ARM_NAMES.get(name.lower(), name)


def table_rows(lines: list[str], header_start: str) -> list[dict]:
    """The rows of the first Markdown table whose header begins with ``header_start``, as column → cell."""
    for index, line in enumerate(lines):
        if line.strip().startswith(header_start):
            header = [cell.strip() for cell in line.strip().strip("|").split("|")]
            rows = []
            for row in lines[index + 2:]:
                if not row.strip().startswith("|"):
                    break
                cells = {}
                for key, cell in zip(header, row.strip().strip("|").split("|")):
                    cells.setdefault(key, cell.strip())  # a repeated column (a second score) is not read
                rows.append(cells)
            return rows
    return []


def report_comparisons(report: str) -> dict:
    """(first arm, second arm) → the report's row, from its table against cross-entropy and its table of OAT
    against its controls."""
    lines = report.splitlines()
    found = {}
    for row in table_rows(lines, "| setting | arm | mean difference"):
        found[(row["arm"], "ce")] = {"difference": row["mean difference"], **row}
    for row in table_rows(lines, "| setting | control | OAT − control"):
        found[("oat", row["control"])] = {"difference": row["OAT − control"], "wins": row["OAT wins"], **row}
    return found


def report_means(report: str) -> dict:
    """Arm → (mean, sd) from the report's first table: the two "ours" columns and the notes' "arm: m ± s"."""
    row = table_rows(report.splitlines(), "| setting | w/o OAT, paper")[0]
    means = {}
    for name, cell in (("ce", row["w/o OAT, ours"]), ("oat", row["OAT, ours"])):
        means[name] = tuple(float(part) for part in cell.split(" ± "))
    for name, mean, sd in re.findall(r"(\w+): (\d+\.\d+) ± (\d+\.\d+)", row["notes"]):
        means[name] = (float(mean), float(sd))
    return means


def study_blocks(readme: str) -> list[tuple[str, str]]:
    """(report path, the README's text about it) for each study of "What this project found" that links its
    report."""
    section = readme.split("## What this project found", 1)[1].split("\n## ", 1)[0]
    blocks = re.split(r"\n(?=\*\*The )", section)
    found = []
    for block in blocks:
        link = re.search(r"\]\((results/[\w/]+/report\.md)\)", block)
        if link:
            found.append((link.group(1), block))
    return found


def mismatches(block: str, report: str) -> tuple[list[str], int]:
    """What in one study's README text disagrees with its report, and how many figures were checked."""
    wrong, checked = [], 0
    comparisons = report_comparisons(report)
    for row in table_rows(block.splitlines(), "| comparison |"):
        first, second = (arm(part) for part in re.sub(r" \(.*\)$", "", row["comparison"]).split(" − "))
        theirs = comparisons.get((first, second))
        if theirs is None:
            wrong.append(f"{row['comparison']}: not in the report")
            continue
        low, high = re.findall(NUMBER, row["95 % interval"])
        their_low, their_high = re.findall(NUMBER, theirs["95 % interval"])
        difference = next(value for key, value in row.items() if key.endswith("difference"))
        pairs = [(difference, theirs["difference"]), (low, their_low), (high, their_high)]
        if "p" in row:
            pairs.append((row["p"], theirs["p"]))
        if "p (Holm)" in row:  # "(raw 0.76)" for a comparison outside the corrected family
            raw = "raw" in row["p (Holm)"]
            pairs.append((re.search(NUMBER, row["p (Holm)"]).group(0), theirs["p" if raw else "p (Holm)"]))
        for printed, exact in pairs:
            checked += 1
            if not agrees(printed, number(exact)):
                wrong.append(f"{row['comparison']}: README {printed}, report {exact}")
        wins = next(value for key, value in row.items() if key.startswith("seeds won"))
        verdict = row.get("verdict", theirs["verdict"])
        checked += 2
        if wins != theirs["wins"] or verdict != theirs["verdict"]:
            wrong.append(f"{row['comparison']}: README {wins}, {verdict}; report {theirs['wins']}, "
                         f"{theirs['verdict']}")
    by_epoch = {row["arm"]: row for row in table_rows(report.splitlines(), "| arm | epoch")}
    for row in table_rows(block.splitlines(), "| arm | epoch"):
        theirs = by_epoch.get(arm(row["arm"]), {})
        for column, printed in row.items():
            if column.startswith("epoch "):
                checked += 1
                if column not in theirs or not agrees(printed, number(theirs[column])):
                    wrong.append(f"{row['arm']}, {column}: README {printed}, report {theirs.get(column)}")
    means = report_means(report)
    for name, mean, sd in MEAN_SD.findall(block):
        theirs = means.get(arm(name))
        checked += 1
        if theirs is None or not (agrees(mean, theirs[0]) and agrees(sd, theirs[1])):
            wrong.append(f"{name}: README {mean} ± {sd}, report {theirs}")
    return wrong, checked


STUDIES = study_blocks(README)


def test_the_finished_studies_are_found():
    reports = {path for path, _ in STUDIES}
    assert {"results/fashion_mnist_study/report.md", "results/fashion_mnist_tuned/report.md",
            "results/fashion_mnist_longtail/report.md"} <= reports


@pytest.mark.parametrize("path, block", STUDIES, ids=[path.split("/")[1] for path, _ in STUDIES])
def test_the_readme_quotes_its_report(path, block):
    wrong, checked = mismatches(block, (ROOT / path).read_text(encoding="utf-8"))
    assert not wrong, f"README.md disagrees with {path}: {wrong}"
    assert checked >= 20  # a table of comparisons and the arms' means were read, not skipped


STUDY_READMES = sorted(path.parent.relative_to(ROOT).as_posix() for path in ROOT.glob("results/*/report.md"))


def test_the_studies_own_readmes_are_found():
    assert {"results/fashion_mnist_study", "results/fashion_mnist_tuned", "results/fashion_mnist_longtail"} <= set(
        STUDY_READMES)


@pytest.mark.parametrize("folder", STUDY_READMES, ids=lambda folder: folder.split("/")[1])
def test_each_study_readme_quotes_its_report(folder):
    text = (ROOT / folder / "README.md").read_text(encoding="utf-8")
    wrong, checked = mismatches(text, (ROOT / folder / "report.md").read_text(encoding="utf-8"))
    assert not wrong, f"{folder}/README.md disagrees with its report.md: {wrong}"
    assert checked >= 20


def test_a_changed_figure_is_caught():
    path, block = next(study for study in STUDIES if "longtail" in study[0])
    report = (ROOT / path).read_text(encoding="utf-8")
    assert mismatches(block, report)[0] == []
    for edit in (("| +1.13 |", "| +1.14 |"), ("+0.37 to", "+0.39 to"), ("9 of 10 | better", "8 of 10 | better"),
                 ("`oat` 83.97 ± 0.51", "`oat` 83.97 ± 0.52"), ("| 0.017 |", "| 0.0086 |")):
        assert edit[0] in block
        wrong, _ = mismatches(block.replace(edit[0], edit[1], 1), report)
        assert len(wrong) == 1, edit
    # The study's own README, whose table has a second score's columns beside the first.
    text = (ROOT / "results/fashion_mnist_longtail/README.md").read_text(encoding="utf-8")
    assert mismatches(text, report)[0] == []
    assert len(mismatches(text.replace("| −1.03 | −1.47 to", "| −1.03 | −1.57 to", 1), report)[0]) == 1


def test_a_changed_mean_by_epoch_is_caught():
    text = (ROOT / "results/fashion_mnist_tuned/README.md").read_text(encoding="utf-8")
    report = (ROOT / "results/fashion_mnist_tuned/report.md").read_text(encoding="utf-8")
    assert mismatches(text, report)[0] == []
    edit = ("| oat | 89.45 | 90.20 |", "| oat | 89.45 | 90.30 |")
    assert edit[0] in text
    assert mismatches(text.replace(*edit, 1), report)[0] == ["oat, epoch 40: README 90.30, report 90.20"]


def test_rounding_is_read_to_the_printed_digits():
    assert agrees("+0.37", 0.365) and agrees("0.0006", 0.000578) and agrees("−0.21", -0.210)
    assert not agrees("+0.38", 0.3861) and not agrees("0.015", 0.0172)
