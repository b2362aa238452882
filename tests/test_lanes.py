"""`make test`'s two lanes (tests/conftest.py): a worker's collection writes each test's scope
to a file, and the controller's scheduler deals whole scopes, the trained model's tests as one.
Were the dealing lost, both lanes would train the phantom model, or wait on each other for it;
were the longest modules dealt last, one lane would run on alone at the end."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest

TESTS = Path(__file__).resolve().parent


def test_every_test_of_the_trained_model_shares_one_lane(pytestconfig, tmp_path, monkeypatch):
    pytest.importorskip("xdist", reason="the lanes are pytest-xdist's (the dev extra)")
    lanes_file = tmp_path / "lanes.json"
    # a lane worker's collection, in a process of its own as xdist's workers are
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         str(TESTS / "test_train.py"), str(TESTS / "test_report.py")],
        capture_output=True, text=True, timeout=240, cwd=TESTS.parent,
        env=dict(os.environ, **{conftest.LANES_FILE: str(lanes_file),
                                "PYTEST_XDIST_WORKER": "gw1"}))
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    monkeypatch.setenv(conftest.LANES_FILE, str(lanes_file))
    monkeypatch.setattr(pytestconfig.option, "tx", ["2*popen"])  # two workers, as -n 2 gives
    scheduler = conftest.pytest_xdist_make_scheduler(pytestconfig, None)

    def lane(test: str) -> str:
        return scheduler._split_scope(f"tests/{test}")

    assert lane("test_train.py::test_two_cpu_workers_learn_phantoms") == "trained"
    # through a module's fixture (labelled_run uses trained_run) as well as directly
    assert lane("test_report.py::test_infer_report_in_a_browser") == "trained"
    # the other tests go module by module, wherever there is room
    assert lane("test_train.py::test_sigterm_stops_training_and_the_rerun_continues_its_clock") \
        == "tests/test_train.py"
    # a test the file does not name (added since the collection) goes with its module
    assert lane("test_new.py::test_x") == "tests/test_new.py"

    # the longest modules named exist (a renamed one would be dealt last)
    assert all((TESTS.parent / module).is_file() for module in conftest.LONGEST_MODULES)
    # the order scopes are handed out in: the trained model's, then the longest modules, then
    # the rest in the order xdist queued them
    queued = ["tests/test_cli.py", "tests/test_storage.py", *reversed(conftest.LONGEST_MODULES),
              conftest.TRAINED_SCOPE]
    scheduler.workqueue.update((scope, {}) for scope in queued)
    dealt = []
    while scheduler.workqueue:
        dealt.append(scheduler.next_scope())
        del scheduler.workqueue[dealt[-1]]
    assert dealt == [conftest.TRAINED_SCOPE, *conftest.LONGEST_MODULES, "tests/test_cli.py",
                     "tests/test_storage.py"]
