"""One small run for the data-parallel tests (test_sharding.py): train both arms on the synthetic dataset,
then evaluate a freshly initialised model at several test batch sizes. Run in the test process (one device)
and as a script in subprocesses with more devices or as one of several processes; prints its result as JSON."""
import itertools
import json
import sys

import jax

import conftest  # registers the synthetic dataset and the stand-in model
from oat_jax import evaluation, steps, train
from oat_jax.config_schema import base_config
from oat_jax.experiment import Experiment

# BatchNorm and dropout included: their statistics and masks must not depend on how the batch is split.
BASE = dict(dataset=conftest.SYNTHETIC, model=conftest.STANDIN_MODEL, dropout_rate=0.2, num_epochs=2,
            pretrain_epochs=1, batch_size=16, eval_batch_size=16, learning_rate=0.01, progress=False,
            shuffle_eval=False)
# Test batches of one (replicated: it does not split), 12 (does not split over 8) and 16 (75 test samples =
# 4 full batches and one of 11 real rows and 5 padded).
EVAL_BATCH_SIZES = (1, 12, 16)


def config_of(overrides: dict):
    config = base_config()
    config.update(dict(BASE, **overrides))
    return config


def run(workdir: str, overrides: dict) -> dict:
    config = config_of(overrides)
    summary = train.train_and_evaluate(config, workdir, report=lambda record: None)
    # A fresh model (the experiment's initial states), near chance, so that equal accuracies are not two
    # perfect scores.
    exp = Experiment.build(config)
    evaluations = {}
    for size in EVAL_BATCH_SIZES:
        accuracies, shares, _ = evaluation.evaluate_in_detail(exp, exp.template, batch_size=size)
        evaluations[str(size)] = {"accuracy": accuracies, "share": {k: v.tolist() for k, v in shares.items()}}
    return {"devices": jax.device_count(), "processes": jax.process_count(), "summary": summary,
            "evaluations": evaluations}


def stop_after_steps(count: int) -> None:
    """Asks this process alone to stop after its ``count``-th training step, as Ctrl-C or SIGTERM would."""
    step, calls = steps.train_step_replicas, itertools.count(1)

    def counting(*args, **kwargs):
        result = step(*args, **kwargs)
        if next(calls) == count:
            train.request_stop()
        return result

    steps.train_step_replicas = counting


def stall_after_steps(count: int) -> None:
    """Makes the ``count``-th training step never finish, as a device that stops answering would: the step
    count of its metrics, which the run waits for, comes from a host callback that sleeps for an hour.

    Only that awaited value stalls; the next step goes on from the real metrics. (Fed into the next step, the
    callback's output was either placed on one device, which the step refuses, or, run on every device, blocked
    its own dispatch on XLA:CPU: the run never reached a wait that the watchdog watches.)"""
    import time
    step, calls, real = steps.train_step_replicas, itertools.count(1), {}
    never = jax.jit(lambda x: jax.pure_callback(lambda v: (time.sleep(3600), v)[1], x, x))

    def stalling(states, metrics, *args, **kwargs):
        states, metrics = step(states, real.pop("metrics", metrics), *args, **kwargs)
        if next(calls) == count:
            real["metrics"] = metrics
            metrics = dict(metrics, steps=never(metrics["steps"]))
        return states, metrics

    steps.train_step_replicas = stalling


if __name__ == "__main__":
    if len(sys.argv) > 3:
        what, _, count = sys.argv[3].rpartition(":")
        (stall_after_steps if what == "stall" else stop_after_steps)(int(count))
    try:
        result = run(sys.argv[1], json.loads(sys.argv[2]))
    except KeyboardInterrupt:
        result = {"stopped": True}
    except Exception as error:  # reported to the test, which checks the message
        result = {"error": f"{type(error).__name__}: {error}"}
    print(json.dumps(result))
