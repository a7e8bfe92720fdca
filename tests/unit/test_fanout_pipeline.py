"""Preprocess fanned out in the compiled pipeline (KFP IR): a plan task, a ParallelFor of
convert tasks with its parallelism, their retry policy and pods, a merge over their Collected
parts; and how ``kubetrain run`` lists and shows such tasks."""

from __future__ import annotations

import io
import json

import pytest
import yaml

from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.live import PlainView, TaskLog
from kubetrain.pipeline.run import task_instances, task_names
from kubetrain.pipeline.submit import compile_pipeline

FAN_OUT = [
    "data.parallel_tasks=3",
    "data.max_parallel_tasks=2",
    "data.convert_retries=4",
    "cluster.steps.preprocess.memory=4Gi",
    "cluster.steps.preprocess_convert.cpu=8",
    "cluster.steps.preprocess_convert.memory=16Gi",
]


def compiled(tmp_path, *settings: str) -> tuple[dict, list]:
    """(the pipeline spec, its kfp-kubernetes platform spec, if any) of ``settings``."""
    out = tmp_path / "pipeline.yaml"
    compile_pipeline(load_config(None, list(settings)), out)
    spec, *platform = yaml.safe_load_all(out.read_text())
    return spec, platform


def dag_tasks(spec: dict) -> dict[str, dict]:
    """Every task of every DAG (the root's and each component's), by name."""
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def resources(spec: dict, task: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["resources"]


def test_the_ir_has_the_parallel_for_with_its_parallelism_retries_and_pods(tmp_path):
    spec, _ = compiled(tmp_path, *FAN_OUT)
    tasks = dag_tasks(spec)
    assert "preprocess" not in tasks
    loops = {name: t for name, t in tasks.items() if "parameterIterator" in t}
    assert len(loops) == 1
    (loop_name, loop), *_ = loops.items()
    assert loop["taskInfo"]["name"] == "ranges"
    assert json.loads(loop["parameterIterator"]["items"]["raw"]) == [0, 1, 2]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2
    assert loop["dependentTasks"] == ["preprocess-plan"]
    convert = tasks["preprocess-convert"]
    assert convert["retryPolicy"]["maxRetryCount"] == 4
    assert convert["retryPolicy"]["backoffDuration"] == "10s"
    assert convert["taskInfo"]["name"] == "Preprocess: convert a range of shards"
    r = resources(spec, "preprocess-convert")
    assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == ("8", "8")
    assert r["resourceMemoryRequest"] == r["resourceMemoryLimit"] == "16Gi"
    for other in ("preprocess-plan", "preprocess-merge"):  # preprocess's entry over the default
        r = resources(spec, other)
        assert (r["resourceCpuLimit"], r["resourceMemoryLimit"]) == ("2", "4Gi"), other
        assert "retryPolicy" not in tasks[other]
    merge = tasks["preprocess-merge"]
    parts = merge["inputs"]["artifacts"]["parts"]
    assert parts["taskOutputArtifact"]["producerTask"] == loop_name
    merge_inputs = spec["components"]["comp-preprocess-merge"]["inputDefinitions"]["artifacts"]
    assert merge_inputs["parts"]["isArtifactList"] is True
    # Everything after preprocess reads the merged dataset.
    tune = tasks["tune"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]
    assert tune == {"outputArtifactKey": "dataset", "producerTask": "preprocess-merge"}


def test_one_task_is_the_pipeline_as_it_was(tmp_path):
    spec, _ = compiled(tmp_path)
    tasks = dag_tasks(spec)
    assert "preprocess" in tasks
    assert not [t for t in tasks if t.startswith("preprocess-")]
    assert not [t for t in tasks.values() if "parameterIterator" in t]


def test_no_retry_policy_when_retries_are_off_and_parallelism_defaults_to_all(tmp_path):
    spec, _ = compiled(tmp_path, "data.parallel_tasks=4", "data.convert_retries=0")
    tasks = dag_tasks(spec)
    assert "retryPolicy" not in tasks["preprocess-convert"]
    (loop,) = [t for t in tasks.values() if "parameterIterator" in t]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 4


def test_a_shard_store_on_the_claim_mounts_it_into_the_convert_and_merge_tasks(tmp_path):
    _, platform = compiled(
        tmp_path, "data.parallel_tasks=2", "cluster.backend=kubernetes",
        "cluster.pvc_name=data", "cluster.mount_path=/mnt/kt",
        "data.shard_store=/mnt/kt/datasets",
    )  # fmt: skip
    executors = platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in ("preprocess-convert", "preprocess-merge"):
        assert executors[f"exec-{task}"]["pvcMount"][0]["mountPath"] == "/mnt/kt", task
    assert "exec-preprocess-plan" not in executors  # it writes no shard


def test_run_lists_the_fanned_out_tasks_in_order_and_counts_the_converts():
    from kubetrain.pipelines import build_pipeline

    pipeline = build_pipeline(load_config(None, ["data.parallel_tasks=3"]))
    names = task_names(pipeline)
    assert names[:4] == ["run-params", "preprocess-plan", "preprocess-convert", "preprocess-merge"]
    assert names[-2:] == ["promote", "reject"]
    assert task_instances(pipeline) == {"preprocess-convert": 3}
    assert task_instances(build_pipeline(load_config(None, []))) == {}


def lines(task: str, status: str | None = "SUCCESS", body: tuple[str, ...] = ()) -> str:
    out = [f"05:39:12.087 - INFO - Executing task \x1b[96m'{task}'\x1b[0m", *body]
    if status:
        out.append(f"05:39:38.806 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status "
                   f"{status}")  # fmt: skip
    return "\n".join(out) + "\n"


@pytest.mark.parametrize(
    ("cached", "states"),
    [(0, ["running", "done"]), (3, ["cached"]), (1, ["running", "done"])],
    ids=["all-run", "all-cached", "some-cached"],
)
def test_a_task_that_runs_three_times_is_one_line_done_when_all_are(tmp_path, cached, states):
    out = io.StringIO()
    log = TaskLog(tmp_path, ["preprocess-convert", "preprocess-merge"],
                  instances={"preprocess-convert": 3})  # fmt: skip
    log.views.append(PlainView(out, width=18))
    for _ in range(cached):
        log.write("05:39:11.000 - INFO - Task preprocess-convert cache hit (key=abc); skipping\n")
    # Two at once, as kfp.local runs a ParallelFor, their lines interleaved.
    running = 3 - cached
    for _ in range(min(running, 2)):
        log.write(lines("preprocess-convert", status=None, body=("converted range ...",)))
    task = log.tasks["preprocess-convert"]
    if running:
        assert task.state == "running" and task.active == min(running, 2)
    for k in range(running):
        if k == 2:
            log.write(lines("preprocess-convert", status=None))
        log.write("05:39:38.806 - INFO - Task 'preprocess-convert' finished with status SUCCESS\n")
        if k < running - 1:
            assert task.state == "running", k  # not done while a range is still to come
    log.finish()
    log.close()
    assert task.state == states[-1]
    assert task.figure == "3/3 done"
    events = [e.split()[1] for e in out.getvalue().splitlines() if "preprocess-convert" in e]
    assert events == states
    assert log.tasks["preprocess-merge"].state == "skipped"


def test_a_failed_range_that_its_retry_converts_ends_done(tmp_path):
    log = TaskLog(tmp_path, ["preprocess-convert"], instances={"preprocess-convert": 2})
    log.write(lines("preprocess-convert"))
    log.write(lines("preprocess-convert", status="FAILURE"))
    assert log.tasks["preprocess-convert"].state == "failed"
    log.write("05:39:40.000 - INFO - Task preprocess-convert failed (attempt 1/3). Retrying\n")
    log.write(lines("preprocess-convert"))
    log.finish()
    log.close()
    assert log.tasks["preprocess-convert"].state == "done"
    assert log.failed() is None


def test_the_run_hands_back_print_when_parallel_tasks_swapped_it_out_of_order():
    """kfp.local indents a task's output by swapping ``builtins.print`` and back; two loop
    iterations on threads can put back each other's indenting print. The run's output context
    hands back the print it found, so the summary after a fan-out starts at column 0."""
    import builtins

    from kfp.local.logging_utils import indented_print

    from kubetrain.pipeline.run import _output_into

    original = builtins.print
    with _output_into(io.StringIO()):
        first, second = indented_print(), indented_print()
        first.__enter__()
        second.__enter__()  # the second iteration saves the first one's indenting print
        first.__exit__(None, None, None)
        second.__exit__(None, None, None)  # ... and puts it back
        assert builtins.print is not original  # kfp.local's leak, as it happens in a run
    assert builtins.print is original
