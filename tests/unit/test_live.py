"""kubetrain.pipeline.live: kfp.local's output filed per task, task states, key figures, a step's error."""

from __future__ import annotations

import io
import json

import pytest

from kubetrain.core.logs import ERROR_MARKER
from kubetrain.pipeline.live import PlainView, TaskLog, key_figure

TASKS = ["preprocess", "tune", "train", "check-accuracy", "promote", "reject"]


def kfp_lines(task: str, *body: str, status: str = "SUCCESS") -> str:
    """What kfp.local prints for one task (its own lines coloured, as it does)."""
    return "\n".join([
        f"05:39:12.087 - INFO - Executing task \x1b[96m'{task}'\x1b[0m",
        "05:39:12.087 - INFO - Streamed logs:",
        "",
        *(f"    {line}" for line in body),
        f"05:39:38.806 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status {status}",
        "",
    ])  # fmt: skip


@pytest.fixture
def task_log(tmp_path):
    out = io.StringIO()
    log = TaskLog(tmp_path / "logs", TASKS)
    log.views.append(PlainView(out))
    yield log, out, tmp_path / "logs"
    log.close()


def test_each_task_gets_its_lines_its_state_and_its_figure(task_log):
    log, out, logs = task_log
    log.write("05:39:11.000 - INFO - Task preprocess cache hit (key=abc); skipping execution.\n")
    # Written in pieces, as a stream is: lines are filed whole.
    text = kfp_lines(
        "tune",
        "05:39:20 I kubetrain.tune.local: trial 1/2 complete val_accuracy=0.9100 best=0.9100 ...",
        "05:39:30 I kubetrain.tune.local: trial 2/2 complete val_accuracy=0.9500 best=0.9500 ...",
    )
    for i in range(0, len(text), 7):
        log.write(text[i : i + 7])
    log.write(kfp_lines("train", "[default0]: 05:40:01 I kubetrain.train.loop: epoch 3/20 loss "
                        "0.1234 val_loss 0.2 val_acc 0.9600 lr 3.00e-03 10348 samples/s ..."))  # fmt: skip
    log.write(kfp_lines("check-accuracy"))
    log.write(kfp_lines("promote"))
    log.finish()
    states = {name: t.state for name, t in log.tasks.items()}
    assert states == {"preprocess": "cached", "tune": "done", "train": "done",
                      "check-accuracy": "done", "promote": "done", "reject": "skipped"}  # fmt: skip
    assert log.tasks["tune"].figure == "trials 2/2, best val_accuracy 0.9500"
    assert log.tasks["train"].figure == ("epoch 3/20, loss 0.1234, val_acc 0.9600, 10348 samples/s")
    log.flush()
    tune_log = (logs / "tune.log").read_text()
    assert "trial 2/2 complete" in tune_log and "epoch 3/20" not in tune_log
    assert "\x1b[" not in tune_log  # colour codes stripped
    assert tune_log in (logs / "pipeline.log").read_text()
    assert not (logs / "reject.log").exists()
    events = out.getvalue().splitlines()
    assert events[0] == "preprocess      cached"
    tune_done = [e for e in events if e.split()[:2] == ["tune", "done"]]
    assert len(tune_done) == 1 and tune_done[0].endswith("s  trials 2/2, best val_accuracy 0.9500")
    assert events[-1] == "reject          skipped"


def test_a_failed_step_keeps_its_error_record_and_last_lines(task_log):
    log, _, logs = task_log
    record = {"type": "ConfigError", "exit_code": 2, "message": "config error: train.lr: bad"}
    log.write(kfp_lines("preprocess"))
    log.write(kfp_lines("tune", "05:39:20 I kubetrain.tune.local: 2 trial(s), 1 at a time",
                        "kubetrain: config error: train.lr: bad",
                        ERROR_MARKER + json.dumps(record), status="FAILURE"))  # fmt: skip
    log.write(
        "05:39:40.000 - INFO - Skipping task condition-branches-1: upstream task(s) failed.\n"
    )
    log.finish()
    failed = log.failed()
    assert failed is not None and failed.name == "tune" and failed.error == record
    assert list(failed.tail) == [
        "05:39:20 I kubetrain.tune.local: 2 trial(s), 1 at a time",
        "kubetrain: config error: train.lr: bad",
    ]  # kfp.local's own lines and the marker are not the step's words
    assert failed.log_file == logs / "tune.log"
    assert "condition-branches-1" not in log.tasks  # a group of the DAG, not a task
    assert log.tasks["train"].state == "skipped"


@pytest.mark.parametrize(
    ("task", "line", "figure"),
    [
        ("quantize", "05:40 I kubetrain.pipeline.steps: dynamic_int8/fbgemm: 203304 -> 52008 bytes",
         "dynamic_int8/fbgemm, 203304 -> 52008 bytes"),
        ("evaluate", "05:41 I kubetrain.pipeline.steps: test accuracy fp32 0.9778 int8 0.9704; size 1 -> 2",
         "test accuracy fp32 0.9778, int8 0.9704"),
        ("tune", "05:40 I kubetrain.pipeline.steps: dynamic_int8/fbgemm: 203304 -> 52008 bytes", ""),
        ("train", "epoch 3/20 of something else", ""),
        ("train", "[default0]: 05:40 I kubetrain.train.loop: epoch 5/5 loss 0.3124 val_loss 0.4 "
         "val_map 0.7126 lr 3.00e-03 37 samples/s ...", "epoch 5/5, loss 0.3124, val_map 0.7126, "
         "37 samples/s"),
    ],
    ids=["quantize", "evaluate", "another-tasks-line", "not-an-epoch-line", "a-detectors-epoch"],
)  # fmt: skip
def test_key_figures(task, line, figure):
    assert key_figure(task, line) == figure


def test_a_step_whose_job_waits_in_a_queue_is_queued_not_running(task_log):
    log, out, _ = task_log
    log.write(
        kfp_lines(
            "train",
            "12:00:01 INFO kubetrain.launch.cluster: submitted trainjob kf/kubetrain-train-1a",
            "12:00:01 INFO kubetrain.launch.cluster: trainjob kf/kubetrain-train-1a: waiting in "
            "queue gpu-queue",
            "12:03:41 INFO kubetrain.launch.cluster: trainjob kf/kubetrain-train-1a: admitted "
            "from queue gpu-queue after 220 s",
            "12:05:00 epoch 1/1 loss 0.31 val_loss 0.2 val_acc 0.93 lr 0.01 900 samples/s",
        )
    )
    events = out.getvalue().splitlines()
    assert events == [
        "train           running",
        "train           queued  waiting in queue gpu-queue",
        "train           running",
        events[3],
    ]
    assert events[3].startswith("train           done") and "val_acc 0.93" in events[3]
    assert log.tasks["train"].state == "done"
