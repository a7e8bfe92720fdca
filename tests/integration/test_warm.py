"""The step server of ``kubetrain run`` (kubetrain.warm): real server, real forked steps, real
task processes talking to it over its socket."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kubetrain.config import load_config
from kubetrain.warm import ENV, StepServer, run_step

# A "task": what a component does -- call run_step -- in a process of its own.
TASK = """
import json, sys
from kubetrain.warm import run_step
try:
    result = run_step(sys.argv[1], sys.argv[2], **json.loads(sys.argv[3]))
except Exception as err:
    print("ERROR", type(err).__name__, err)
    sys.exit(1)
print("RESULT", json.dumps(result))
"""


def task(step: str, config_json: str, **kwargs: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TASK, step, config_json, json.dumps(kwargs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_ready(log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and "step server ready" in log.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"step server not ready after {timeout} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "step-server.log"
    with StepServer(log) as srv:
        assert os.environ[ENV] == srv.address
        wait_ready(log)
        yield srv, log
    assert ENV not in os.environ
    assert not Path(srv.address).exists()  # its private directory is gone
    assert srv.proc.returncode == 0  # and the server with it, cleanly


def test_without_a_server_the_step_runs_in_the_calling_process(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    meta = run_step("preprocess", load_config().model_dump_json(), out_dir=tmp_path / "ds")
    assert meta["sizes"]["train"] > 1000 and (tmp_path / "ds" / "meta.json").is_file()


def test_a_task_gets_the_same_step_result_from_a_forked_child_and_its_log(server, tmp_path):
    srv, log = server
    cfg = load_config().model_dump_json()
    proc = task("preprocess", cfg, out_dir=str(tmp_path / "ds"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    warm = json.loads(out.split("RESULT", 1)[1])
    assert f"step preprocess for task pid {proc.pid}" in log.read_text()  # served, not local
    assert "dataset " in err  # the step's own log line went to the task's stderr
    os.environ.pop(ENV)
    try:
        cold = run_step("preprocess", cfg, out_dir=tmp_path / "cold")
    finally:
        os.environ[ENV] = srv.address
    assert warm["version"] == cold["version"]  # the same data, split and normalisation
    assert warm["sizes"] == cold["sizes"]


def test_a_user_error_in_the_step_reaches_the_task_as_the_same_error(server, tmp_path):
    cfg = load_config(overrides=[f"data.source={tmp_path}/missing.csv"]).model_dump_json()
    proc = task("preprocess", cfg, out_dir=str(tmp_path / "ds"))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert out.startswith("ERROR DataError") and "missing.csv" in out, out + err
    assert "Traceback" not in err  # a user error: one line, no traceback from the step
    assert not (tmp_path / "ds").exists()


def test_a_served_search_forks_its_trials_and_finds_what_fresh_trials_find(
    server, tmp_path, digits_dir
):
    cfg = load_config(overrides=["tune.max_trials=4", "tune.trial_epochs=2"])
    proc = task("tune", cfg.model_dump_json(), dataset_dir=str(digits_dir),
                out_dir=str(tmp_path / "warm"))  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + err
    assert "in forked worker processes" in err  # torch is in: no trial imports it again
    os.environ.pop(ENV)
    try:
        from kubetrain import steps

        cold = steps.tune(cfg, digits_dir, tmp_path / "cold")
    finally:
        os.environ[ENV] = server[0].address
    warm = json.loads(out.split("RESULT", 1)[1])
    assert warm["best_params"] == cold["best_params"]
    assert warm["best_value"] == cold["best_value"]


def test_killing_the_task_kills_the_step_and_everything_it_started(server, tmp_path, digits_dir):
    _, log = server
    cfg = load_config(
        overrides=["train.nproc=2", "train.epochs=100000", "tune.enabled=false",
                   f"train.checkpoint_dir={tmp_path / 'ckpt'}"]
    ).model_dump_json()  # fmt: skip
    proc = task("train", cfg, dataset_dir=str(digits_dir), out_dir=str(tmp_path / "model"))
    deadline = time.monotonic() + 120
    pid = None
    while pid is None and time.monotonic() < deadline:
        found = re.search(rf"step train for task pid {proc.pid}: pid (\d+) ", log.read_text())
        pid = int(found[1]) if found else None
        time.sleep(0.2)
    assert pid is not None, log.read_text()
    # Wait until torchrun's workers run, so there is a process tree to end.
    while len(tree(pid)) < 4 and time.monotonic() < deadline:
        time.sleep(0.2)
    started = tree(pid)
    assert len(started) >= 4, started  # the step, torchrun, its two workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while alive(started) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(started)
    assert not (tmp_path / "model" / "metrics.json").exists()


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[int(stat.parent.name)] = (int(fields[1]), fields[0])
    return found


def tree(root: int) -> set[int]:
    """``root`` and its descendants."""
    procs = processes()
    found = {root} if root in procs else set()
    grew = True
    while grew:
        more = {p for p, (ppid, _) in procs.items() if ppid in found} - found
        found |= more
        grew = bool(more)
    return found


def alive(pids: set[int]) -> set[int]:
    procs = processes()
    return {p for p in pids if p in procs and procs[p][1] != "Z"}
