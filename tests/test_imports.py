"""Importing oat_jax: no module changes the process's global state, and no two modules import each other; a run
gives back what it installs (the filters of a failed save's noise: an unraisable hook, log filters; the
compile-time listener; the stall watchdog's thread)."""
import ast
import pathlib
import subprocess
import sys
import threading

from oat_jax import checkpoints, dispatch, train

ROOT = pathlib.Path(__file__).resolve().parent.parent

SNAPSHOT = '''
def snapshot():
    import logging, signal, sys, threading
    from jax._src import monitoring
    return {"unraisablehook": sys.unraisablehook, "excepthook": sys.excepthook,
            "listeners": [list(listeners()) for listeners in (
                monitoring.get_event_listeners, monitoring.get_event_duration_listeners,
                monitoring.get_event_time_span_listeners, monitoring.get_scalar_listeners)],
            "threads": sorted(thread.name for thread in threading.enumerate()),
            "log filters": [list(logging.getLogger(name).filters) for name in ("", "absl", "asyncio")],
            "signal handlers": [signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)]}
'''
exec(SNAPSHOT)  # the same snapshot in this process


def _modules() -> dict[str, pathlib.Path]:
    return {".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
            for path in sorted((ROOT / "oat_jax").rglob("*.py"))}


def test_no_two_modules_import_each_other():
    """Imports inside functions included; a package and its own modules (a registry) aside."""
    modules = _modules()
    imports = {}
    for name, path in modules.items():
        named = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                named |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        imports[name] = {other for other in named & set(modules) if other != name
                         and not other.startswith(name + ".") and not name.startswith(other + ".")}

    def reaches(start, target, seen):
        return any(other == target or (other not in seen and reaches(other, target, seen | {other}))
                   for other in imports[start])
    assert [name for name in modules if reaches(name, name, {name})] == []


def test_importing_any_module_of_oat_jax_changes_no_global_state():
    modules = list(_modules())
    code = SNAPSHOT + f"""
import importlib
before = snapshot()  # with JAX imported, as every module of oat_jax needs it
for name in {modules!r}:
    importlib.import_module(name)
after = snapshot()
print([key for key in before if before[key] != after[key]])
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def lasting_filter_set_aside(state):
    return {**state, "log filters": [[f for f in filters if f is not checkpoints._not_disk_full]
                                     for filters in state["log filters"]]}


def test_a_run_installs_its_hooks_and_listener_only_while_it_runs(synthetic_config, tmp_path):
    synthetic_config.num_epochs, synthetic_config.pretrain_epochs = 2, 1
    before, during = snapshot(), []
    train.train_and_evaluate(synthetic_config, str(tmp_path), report=lambda record: during.append(snapshot()))
    assert during and all(state["unraisablehook"] != before["unraisablehook"]
                          and state["listeners"] != before["listeners"]
                          and state["log filters"] != before["log filters"] for state in during)
    after = snapshot()
    # Threads of the libraries' own (tensorboardX's queue feeder, say) may still be finishing their work. The
    # full-disk filter stays for the process by design (checkpoints.quiet_checkpoint_noise), so whether it is
    # there before depends on whether this worker already ran a run: it alone is set aside.
    assert {**lasting_filter_set_aside(after), "threads": None} == {**lasting_filter_set_aside(before), "threads": None}
    assert all(checkpoints._not_disk_full in filters for filters in after["log filters"][1:])
    assert not [name for name in after["threads"] if name.startswith("oat_jax")]


def test_the_watchdog_watches_with_a_thread_of_its_own_only_while_running():
    def watching() -> bool:
        return any(thread.name == "oat_jax-stall-watchdog" for thread in threading.enumerate())

    watchdog = dispatch.StallWatchdog()
    with watchdog.running(60):
        with watchdog.waiting(lambda: "a step"):
            assert watching()
    assert not watching() and not watchdog.timeout
    with watchdog.waiting(lambda: "a step"):  # outside a run: nothing watches
        assert not watching()


def test_no_test_module_imports_another():
    """Helpers shared by test modules live in conftest.py (or, for the PyTorch references, a module of no tests)."""
    importers = set()
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            importers.update({(path.name, name) for name in names if name.split(".")[0].startswith("test_")})
    assert not importers
