"""What `kubetrain run` shows: one line per task event off a terminal, a live table on one (a real
terminal: tmux), kfp.local's output in <run>/logs/, and a failed step's own one-line error with
its exit code. Real kfp.local runs of a small pipeline."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, run_cli

# Small enough for seconds per step; every step still runs, the gate takes its promote branch.
SMALL = [
    "tune.max_trials=2", "tune.trial_epochs=1", "tune.parallel_trials=1",
    "train.epochs=2", "train.nproc=1", "model.hidden_sizes=[32]",
    "quantize.method=dynamic_int8", "quantize.max_accuracy_drop=0.2",
    "evaluate.latency_repeats=3", "evaluate.min_accuracy=0.5",
]  # fmt: skip
TASKS = ("preprocess", "tune", "train", "quantize", "evaluate", "check-accuracy", "promote")


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """One small run with its output going to a pipe (not a terminal)."""
    out = tmp_path_factory.mktemp("run") / "r"
    proc = run_cli("run", "--output", str(out), *sets(*SMALL))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.fixture
def rerun_dir(tmp_path) -> Path:
    """A run directory of this test's own, where the small run has run once: the test runs
    again in it (from its cache), and no test depends on what another ran before it. (A copy
    of another run's directory would not do: the run's paths are in the steps' inputs.)"""
    out = tmp_path / "r"
    proc = run_cli("run", "--output", str(out), *sets(*SMALL))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_off_a_terminal_each_task_event_is_one_plain_line(plain_run):
    out, proc = plain_run
    lines = proc.stdout.splitlines()
    assert len(lines) <= 40  # `make run` on success: the view and the summary, no kfp echo
    for task in TASKS:
        assert any(line.split()[:2] == [task, "running"] for line in lines), proc.stdout
        assert any(line.split()[:2] == [task, "done"] for line in lines), proc.stdout
    assert any(line.split()[:2] == ["reject", "skipped"] for line in lines)  # branch not taken
    done = {line.split()[0]: line for line in lines if line.split()[1:2] == ["done"]}
    assert "trials 2/2, best val_accuracy" in done["tune"]
    assert "epoch 2/2, loss" in done["train"] and "samples/s" in done["train"]
    assert "dynamic_int8" in done["quantize"]
    assert "\x1b[" not in proc.stdout  # no terminal codes in a pipe
    assert "Executing task" not in proc.stdout + proc.stderr  # kfp.local's echo went to the logs
    assert f"logs:               {out / 'logs'}" in lines
    assert lines[-1].startswith("pipeline time:")


def test_kfp_output_goes_to_a_log_per_task_and_one_combined_log(plain_run):
    out, _ = plain_run
    logs = out / "logs"
    combined = (logs / "pipeline.log").read_text()
    for task in TASKS:
        text = (logs / f"{task}.log").read_text()
        assert f"Executing task '{task}'" in text
        assert f"Task '{task}' finished with status SUCCESS" in text
        assert text.strip() in combined  # each task's part, as it is in the combined log
    assert "trial 2/2 complete" in (logs / "tune.log").read_text()
    assert "epoch 2/2" in (logs / "train.log").read_text()
    assert not (logs / "reject.log").exists()


@pytest.mark.parametrize(
    ("overrides", "code", "last_line"),
    [
        (["tune.algorithm_settings={n_startup_trials: abc}"], 2,
         "kubetrain: tune: config error: tune.algorithm_settings.n_startup_trials: expected an "
         "integer (got 'abc') (log: {logs}/tune.log)"),
        (["tune.max_failed_trials=0", "tune.parameters=[{name: train.batch_size, parameterType: "
          "categorical, feasibleSpace: {list: [4096]}}]"], 1,
         "kubetrain: tune: tuning failed: 1 trials failed (tune.max_failed_trials = 0); first "
         "error: ConfigError: config error: train.batch_size 4096 exceeds the 1257 training "
         "samples (log: {logs}/tune.log)"),
        pytest.param(
            ["tune.enabled=false", "train.precision=fp16"], 2,
            "kubetrain: train: config error: train.precision: fp16 needs a GPU (use bf16 or fp32)"
            " (log: {logs}/train.log)",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 runs on a GPU"),
        ),
    ],
    ids=["config-error-in-tune", "search-failed", "fp16-without-gpu"],
)  # fmt: skip
def test_a_failing_step_says_what_it_would_say_alone(tmp_path, overrides, code, last_line):
    out = tmp_path / "run"
    proc = run_cli("run", "--output", str(out), *sets(*SMALL, *overrides))
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    expected = last_line.format(logs=out / "logs")
    assert last.startswith(expected) if expected.endswith(" ") else last == expected, last
    assert last.endswith(".log)") and "(log: " in last
    assert "Traceback" not in proc.stderr + proc.stdout
    assert len([ln for ln in proc.stderr.splitlines() if ln.startswith("kubetrain:")]) == 1
    step = last.split(":")[1].strip()
    assert f"last lines of {step} ({out / 'logs' / step}.log):" in proc.stdout
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()
    assert not list(out.glob("kfp/*/evaluate/evaluation/metrics.json"))


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_on_a_terminal_the_view_is_one_line_per_task_redrawn_in_place(rerun_dir, tmp_path):
    out = rerun_dir
    # A re-run with another bar: the steps before it come from the cache, the gate rejects.
    cmd = [sys.executable, "-m", "kubetrain.cli", "run", "--output", str(out),
           *sets(*SMALL, "evaluate.min_accuracy=0.9999")]  # fmt: skip
    socket = f"kubetrain-test-{uuid.uuid4().hex[:8]}"
    shell = f"cd {shlex.quote(str(REPO))} && {shlex.join(cmd)}; echo EXIT=$?; sleep 600"
    env = {**os.environ, "TERM": "xterm-256color"}
    subprocess.run(["tmux", "-L", socket, "new-session", "-d", "-x", "110", "-y", "40", shell],
                   check=True, env=env)  # fmt: skip
    try:
        screen = ""
        deadline = time.monotonic() + 300
        while "EXIT=" not in screen and time.monotonic() < deadline:
            time.sleep(1)
            screen = _tmux("-L", socket, "capture-pane", "-p", "-t", "0")
    finally:
        subprocess.run(["tmux", "-L", socket, "kill-server"], check=False)
    (tmp_path / "screen.txt").write_text(screen)
    print(screen)
    assert "EXIT=0" in screen, screen
    rows = {line.split()[1]: line.split()[0] for line in screen.splitlines()
            if len(line.split()) > 1 and line.split()[0] in
            ("waiting", "running", "cached", "done", "failed", "skipped")}  # fmt: skip
    assert rows == {
        "run-params": "done",  # never from the cache: {date} may need today
        "preprocess": "cached", "tune": "cached", "train": "cached", "quantize": "cached",
        "evaluate": "done", "check-accuracy": "done", "reject": "done", "promote": "skipped",
    }, screen  # fmt: skip
    assert "test accuracy fp32" in screen and "promoted:           no (below the bar)" in screen
    assert screen.count("preprocess") == 1  # redrawn in place, not printed once per refresh


def test_verbose_streams_kfp_output(rerun_dir):
    out = rerun_dir
    proc = run_cli("run", "-v", "--output", str(out), *sets(*SMALL))  # all from the cache
    assert proc.returncode == 0, proc.stderr[-3000:]
    for task in ("preprocess", "tune", "train", "quantize", "evaluate"):
        assert f"Task {task} cache hit" in proc.stdout
    assert "cached" not in [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]
    assert proc.stdout.splitlines()[-1].startswith("pipeline time:")
