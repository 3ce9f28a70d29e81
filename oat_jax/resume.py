"""Where a rerun resumes: each arm's last epoch that metrics.jsonl records for every live seed, and its latest
checkpoint that restores (past damaged ones and ones ahead of the log); a finished run's summary read back."""
from __future__ import annotations

from oat_jax import distributed
from oat_jax import workdir as workdir_lib
from oat_jax.checkpoints import ArmCheckpoints, ResumePoint
from oat_jax.experiment import Experiment
from oat_jax.names import PRETRAIN
from oat_jax.workdir import MetricsLog


def plan(workdir: str, exp: Experiment, log: MetricsLog, checkpoints: dict[str, ArmCheckpoints]):
    """(a finished run's summary or None; each arm's ResumePoint, or None: start afresh, an arm from the
    pre-training's end)."""
    ended = _ended_seeds(log.divergences())
    logged = _logged_epochs(log.records(), exp.seeds, ended)
    diverged = {arm for arm, seeds in ended.items() if set(exp.seeds) <= set(seeds)}  # every seed ended
    finished = _finished_summary(workdir, exp, logged, diverged)
    if finished is not None:
        return finished, {}
    return None, _resume_points(checkpoints, exp, logged, diverged)


def _ended_seeds(divergences) -> dict[str, dict[int, int]]:
    """Per arm, the seeds that diverged and the epoch each diverged in."""
    ended: dict[str, dict[int, int]] = {}
    for event in divergences:
        ended.setdefault(event["arm"], {})[event["seed"]] = event["epoch"]
    return ended


def _logged_epochs(records, seeds, ended: dict | None = None) -> dict:
    """Each arm's last epoch that metrics.jsonl records for every seed not ``ended`` by then."""
    seen = {(r["arm"], r["epoch"], r["seed"]) for r in records}
    logged = {}
    for arm, epoch, _ in seen:
        stopped = (ended or {}).get(arm, {})
        if all((arm, epoch, seed) in seen for seed in seeds if stopped.get(seed, epoch + 1) > epoch):
            logged[arm] = max(logged.get(arm, 0), epoch)
    return logged


def _resume_points(checkpoints: dict[str, ArmCheckpoints], exp: Experiment, logged, diverged) -> dict:
    """Each arm's ResumePoint or None. A finished or ``diverged`` arm is not restored (its point holds no
    states); the pre-training only when something still needs it."""
    config, points = exp.config, {}
    for arm in exp.arms:
        latest = checkpoints[arm].latest_epoch()
        finished = latest == config.num_epochs and logged.get(arm) == latest
        if arm in diverged:
            finished, latest = True, latest or config.pretrain_epochs
        points[arm] = (ResumePoint(latest, 0, None, None) if finished else checkpoints[arm].restore_latest(
            exp.template, distributed.warn, max(logged.get(arm, 0), config.pretrain_epochs)))
    pretrained = checkpoints[PRETRAIN].latest_epoch() or 0
    if (any(point is None for point in points.values()) or pretrained < config.pretrain_epochs
            or pretrained > logged.get(PRETRAIN, 0)):
        points[PRETRAIN] = checkpoints[PRETRAIN].restore_latest(exp.template, distributed.warn,
                                                                logged.get(PRETRAIN, 0))
    else:
        points[PRETRAIN] = ResumePoint(pretrained, 0, None, None)
    return points


def _finished_summary(workdir: str, exp: Experiment, logged, diverged) -> dict | None:
    """summary.json of a run with every arm logged to its last epoch or diverged (its checkpoints not needed:
    a study keeps none); None otherwise."""
    config = exp.config
    nothing_after_pretraining = config.pretrain_epochs == config.num_epochs
    if logged.get(PRETRAIN, 0) < config.pretrain_epochs or not all(
            logged.get(arm) == config.num_epochs or arm in diverged or nothing_after_pretraining
            for arm in exp.arms):
        return None
    try:
        return workdir_lib.read_summary(workdir)
    except workdir_lib.WorkdirError:
        return None
