"""``kubetrain run``: the whole pipeline on this machine under KFP's local runner.

Every step runs as a KFP task: with the ``subprocess`` runner a subprocess of this interpreter
(exactly the component code a cluster runs), with the ``docker`` runner a container of the
runtime image (``kubetrain.launch.image``), as on a cluster. Caching makes a re-run into the same
directory skip finished steps.

kfp.local's output goes to ``<run>/logs/`` (``kubetrain.pipeline.live``); the terminal shows one line per
task, or everything with ``verbose``. A step that fails says why in the one line it would print
alone, with its exit code and the path of its log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from kubetrain.core import artifacts
from kubetrain.core.artifacts import RUN_MARKER
from kubetrain.core.errors import ConfigError, DataError, KubetrainError
from kubetrain.core.io import read_json, write_json
from kubetrain.pipeline import steps
from kubetrain.pipeline.config import PipelineConfig

if TYPE_CHECKING:
    from kubetrain.data.sources import RawData

log = logging.getLogger(__name__)

RUNNERS = ("subprocess", "docker")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    report: Path | None  # None: nothing was trained
    promoted_model: Path | None
    seconds: float
    retrained: bool = True  # False: retrain.only_if_changed found nothing new
    reason: str = ""
    data_notes: list[str] = field(default_factory=list)  # what preprocess dropped or cut


class StepFailed(KubetrainError):
    """A pipeline task failed. The message is the step's own line (or its last log line) with
    the path of its log; the exit code is the one the step's error carries."""

    def __init__(self, message: str, exit_code: int = 1, step: str = "") -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.step = step  # the failed task's name ("" when none is known)


class TrackingFailed(KubetrainError):
    """Only the tracking task failed: the run's results are written (``result``), the line
    says why the tracking server did not get them."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result


def preflight(cfg: PipelineConfig) -> None:
    """Check what can be checked before anything is written, so that a run fails in seconds
    rather than after the search: the data can be read and split with every class in every
    part, the training split holds at least ``train.batch_size`` samples, the model fits.

    Raises:
        KubetrainError: the cluster backend is chosen (``kubetrain run`` is local).
        DataError: the data cannot be read, has one class, or cannot be split.
        ConfigError: the model or the batch size does not fit the data.
    """
    from kubetrain.pipeline.steps import check_supported

    if cfg.cluster.backend != "local":
        raise KubetrainError(
            "cluster.backend 'kubernetes' is for cluster runs; `kubetrain run` runs locally "
            "(use cluster.backend=local)"
        )
    check_supported(cfg)
    from kubetrain.tasks import kind_of
    from kubetrain.tasks import preflight as kind_preflight

    kind = kind_of(cfg.data)
    cfg.evaluate.primary_metric(kind)  # evaluate.metric=bleu on classification: refused now
    if kind != "tabular":  # streamed kinds check what they can themselves
        if kind != "detection":  # detectors have builders of their own (models.detection)
            _check_model_name(cfg, kind == "images")
        kind_preflight(cfg.data)
        return
    _preflight_tabular(cfg)


def _preflight_tabular(cfg: PipelineConfig) -> None:
    """A table's checks: it is read whole, so the model, classes and split can be checked."""
    from kubetrain.data.sources import load_source
    from kubetrain.pipeline.params import expand_date

    # The params task expands {date} in data.source (today, for a local run); so does this check.
    source = expand_date(cfg.data.source, datetime.now(timezone.utc))
    raw = load_source(cfg.data.model_copy(update={"source": source}))
    if cfg.model.name == "cnn" and raw.image_shape is None:
        raise ConfigError(
            "config error: model.name: 'cnn' needs image data; set data.image_shape (C,H,W) "
            "for images stored as columns, or use 'mlp'"
        )
    _check_model_name(cfg, raw.image_shape is not None)
    _check_split(cfg, raw)


def _check_split(cfg: PipelineConfig, raw: RawData) -> None:
    """The preprocess step's own checks and split (the same functions), without writing: at
    least 2 classes, every class in every split, a batch's worth of training samples."""
    from kubetrain.data.dataset import encode_labels, split_indices

    y, classes = encode_labels(raw.y)
    if len(classes) < 2:
        raise DataError(f"data error: {raw.source}: needs at least 2 classes, found {len(classes)}")
    parts = split_indices(y, cfg.data)
    for name, idx in parts.items():
        missing = len(classes) - len(set(y[idx].tolist()))
        if missing:
            raise DataError(
                f"data error: {raw.source}: the {name} split ({len(idx)} samples) lacks "
                f"{missing} of the {len(classes)} classes; use more data or change "
                "data.val_fraction / data.test_fraction"
            )
    n_train = len(parts["train"])
    if cfg.train.batch_size > n_train:
        raise ConfigError(
            f"config error: train.batch_size {cfg.train.batch_size} exceeds the {n_train} "
            "training samples"
        )


def _check_model_name(cfg: PipelineConfig, image_data: bool) -> None:
    """The model's name and weights, before the first step (``check_model_name``); the
    built-in networks need no look."""
    if ":" in cfg.model.name or cfg.model.weights:
        from kubetrain.models.vision import check_model_name

        check_model_name(cfg.model, image_data, cfg.data.storage_options)


def prepare_run_dir(output: Path | None) -> Path:
    """The run directory: ``output`` or ``runs/<timestamp>``; never someone else's files.

    Args:
        output: ``--output``, or None for a new ``runs/<timestamp>``.

    Returns:
        The run directory, created and marked as a kubetrain run, as an absolute path.

    Raises:
        UsageError: ``output`` is a file or cannot be written in (exit 2).
        KubetrainError: ``output`` holds files that are not a kubetrain run's (exit 1).
    """
    from kubetrain.core.io import check_writable_dir

    run_dir = output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    check_writable_dir(run_dir, "--output" if output is not None else "run directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / RUN_MARKER).exists():
        raise KubetrainError(
            f"{run_dir}: exists, is not empty and is not a kubetrain run directory; "
            "choose another --output"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_MARKER).touch()
    return run_dir.resolve()


def docker_runner(pipeline_root: Path) -> Any:
    """A ``kfp.local.DockerRunner`` whose containers are held as a cluster holds its pods.

    The root filesystem is read-only with a tmpfs on /tmp (the manifests' securityContext).
    Steps run as the image's own non-root user when this process is root -- the pipeline root
    is handed to that user so the steps can write their outputs -- and as the calling user
    otherwise, so the outputs stay theirs. Raises KubetrainError if the image is missing.
    """
    import os

    from kfp import local

    try:
        import docker
    except ImportError:
        raise KubetrainError(
            "runner docker: the `docker` Python package is missing (pip install 'docker>=7')"
        ) from None

    from kubetrain.launch.image import runtime_image

    image = runtime_image()
    try:
        client = docker.from_env()
    except docker.errors.DockerException as err:
        raise KubetrainError(f"runner docker: cannot reach the Docker engine ({err})") from None
    try:
        user = client.images.get(image).attrs["Config"].get("User") or ""
    except docker.errors.ImageNotFound:
        raise KubetrainError(
            f"runner docker: image {image} is not in the local Docker engine; build it with "
            "`make images` (or set KUBETRAIN_IMAGE)"
        ) from None
    finally:
        client.close()
    args: dict[str, Any] = {"read_only": True, "tmpfs": {"/tmp": "rw,exec,size=2g"}}
    pipeline_root.mkdir(parents=True, exist_ok=True)
    if os.getuid() != 0:
        args.update(user=f"{os.getuid()}:{os.getgid()}", environment={"HOME": "/tmp"})
    elif user and user.split(":")[0] not in ("0", "root"):
        uid, _, gid = user.partition(":")
        if not (uid.isdigit() and (gid or "0").isdigit()):
            raise KubetrainError(f"runner docker: image {image} has a non-numeric USER {user!r}")
        os.chown(pipeline_root, int(uid), int(gid or uid))
    return local.DockerRunner(**args)


def run_local(
    cfg: PipelineConfig,
    output: Path | None = None,
    cache: bool = True,
    runner: str = "subprocess",
    verbose: bool = False,
    out: IO[str] | None = None,
) -> RunResult:
    """Run the pipeline under kfp.local; return its metrics and paths.

    Args:
        cfg: the validated config.
        output: the run directory (default ``runs/<timestamp>``).
        cache: reuse the outputs of tasks that ran before with the same inputs.
        runner: one of RUNNERS.
        verbose: pass kfp.local's whole output on to ``out`` instead of the task view.
        out: where the task view goes (default stdout; redrawn in place on a terminal).

    Returns:
        The run's metrics, report and promoted model (or why nothing was trained).

    Raises:
        KubetrainError: bad input found before the run (nothing written), or ``StepFailed``.
    """
    if runner not in RUNNERS:
        raise KubetrainError(f"runner {runner!r}: expected one of {', '.join(RUNNERS)}")
    preflight(cfg)
    run_dir = prepare_run_dir(output)
    # A failed re-run leaves no old result behind.
    for result_file in (artifacts.RUN_METRICS, artifacts.RUN_REPORT):
        (run_dir / result_file).unlink(missing_ok=True)
    started = time.perf_counter()
    try:
        task, _ = _run_pipeline(cfg, run_dir, cache, runner, verbose, out or sys.stdout)
    except StepFailed as err:
        if err.step != "track":
            raise
        # The model was trained, evaluated and gated before tracking ran: a tracking server
        # that is down must not cost the run its results. They are written, then the line.
        found = _find_output(run_dir / "kfp", "evaluate", "evaluation")
        if found is None:
            raise
        result = _write_results(run_dir, found, None, time.perf_counter() - started)
        raise TrackingFailed(str(err), result) from None
    seconds = time.perf_counter() - started
    if cfg.retrain.only_if_changed:
        # This pipeline's one output is the decision; the evaluation is found on disk.
        if not task.output:
            reason = "data and config unchanged since the last promoted model"
            return RunResult(run_dir, {}, None, None, seconds, retrained=False, reason=reason)
        found = _find_output(run_dir / "kfp", "evaluate", "evaluation")
        if found is None:
            raise KubetrainError(f"pipeline ran but wrote no evaluation under {run_dir / 'kfp'}")
        evaluation = found
        metrics = read_json(evaluation / artifacts.EVAL_METRICS)
        promoted = bool(metrics["promoted"])
    else:
        evaluation = Path(task.outputs["evaluation"].path)
        promoted = bool(task.outputs["promoted"])
    return _write_results(run_dir, evaluation, promoted, seconds)


def _write_results(
    run_dir: Path, evaluation: Path, promoted: bool | None, seconds: float
) -> RunResult:
    """``metrics.json`` and ``report.html`` of the run from its evaluation artifact;
    ``promoted`` None: the gate's verdict as the evaluation recorded it."""
    metrics = read_json(evaluation / artifacts.EVAL_METRICS)
    promoted = bool(metrics["promoted"]) if promoted is None else promoted
    metrics["promoted"] = promoted
    metrics["pipeline_seconds"] = seconds
    write_json(run_dir / artifacts.RUN_METRICS, metrics)
    shutil.copyfile(evaluation / artifacts.EVAL_REPORT, run_dir / artifacts.RUN_REPORT)
    promoted_dir = _find_output(run_dir / "kfp", "promote", "promoted") if promoted else None
    return RunResult(run_dir, metrics, run_dir / artifacts.RUN_REPORT, promoted_dir, seconds,
                     data_notes=data_notes(run_dir))  # fmt: skip


def data_notes(run_dir: Path) -> list[str]:
    """What the run's preprocess step dropped, skipped or clipped (its dataset meta's
    ``notes``): the terminal shows it, not only the step's log."""
    # One preprocess task, or a fanned-out preprocess's merge task: the newest of them.
    found = [_find_output(run_dir / "kfp", task, "dataset")
             for task in ("preprocess", "preprocess-merge")]  # fmt: skip
    dataset = max((d for d in found if d), key=lambda d: d.stat().st_mtime, default=None)
    try:
        meta = read_json(dataset / artifacts.DATASET_META) if dataset else {}
    except (OSError, ValueError):
        return []
    return [str(n) for n in meta.get("notes") or []]


def _run_pipeline(
    cfg: PipelineConfig, run_dir: Path, cache: bool, runner: str, verbose: bool, out: IO[str]
) -> tuple[Any, float]:
    """Compile and run the pipeline under kfp.local; the final task and the start time.

    Raises:
        StepFailed: a task failed.
    """
    from kubetrain.pipelines import build_pipeline

    if cfg.train.checkpoint_dir is None:
        # A stable place, so a re-run after a failed train step resumes from its checkpoints
        # (under the pipeline root, which the docker runner mounts too).
        cfg = cfg.with_params({"train.checkpoint_dir": str(run_dir / "kfp" / "checkpoints")})
    pipeline = build_pipeline(cfg)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    _init_kfp_local(run_dir, cache, runner)
    task_log, live = _task_log(pipeline, run_dir, verbose, out)
    failure: RuntimeError | None = None
    started = time.perf_counter()
    tasks_tmp = _tasks_temp_dir() if runner == "subprocess" else contextlib.nullcontext()
    with tasks_tmp, task_log, warnings.catch_warnings(), live, _output_into(task_log):
        # kfp warns for every task whose base image name lacks "python"; ours is a Python image.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            task = pipeline(min_accuracy=steps.promotion_bar(cfg))
        except RuntimeError as err:
            failure = err
        finally:
            task_log.finish()  # also on Ctrl-C: the view ends with every task's last state
    if failure is not None:
        raise _step_failure(task_log, failure, run_dir, None if verbose else out)
    return task, started


def _init_kfp_local(run_dir: Path, cache: bool, runner: str) -> None:
    """Point kfp.local at the run directory, with the chosen runner (``RUNNERS``)."""
    from kfp import local

    if runner == "docker":
        kfp_runner = docker_runner(run_dir / "kfp")
    else:
        kfp_runner = local.SubprocessRunner(use_venv=False)
    local.init(
        runner=kfp_runner,
        pipeline_root=str(run_dir / "kfp"),
        enable_caching=cache,
        cache_root=str(run_dir / "kfp" / ".cache"),
    )


def _task_log(pipeline: Any, run_dir: Path, verbose: bool, out: IO[str]) -> tuple[Any, Any]:
    """The tasks' log (``<run>/logs/``) and what shows it: with ``verbose`` kfp.local's whole
    output is echoed; otherwise a live view on a terminal or a line per task elsewhere.

    Returns:
        The ``TaskLog`` and a context to hold while the pipeline runs (the live view, or a
        no-op).
    """
    from kubetrain.pipeline.live import LiveView, PlainView, TaskLog

    names = task_names(pipeline)
    task_log = TaskLog(
        run_dir / "logs", names, echo=out if verbose else None, instances=task_instances(pipeline)
    )
    live: Any = contextlib.nullcontext()
    if not verbose:
        width = max(15, *(len(n) for n in names))
        view = LiveView(task_log, out) if out.isatty() else PlainView(out, width)
        task_log.views.append(view)
        live = view if isinstance(view, LiveView) else live
    return task_log, live


@contextlib.contextmanager
def _tasks_temp_dir() -> Iterator[Path]:
    """A temporary directory of ours as the tasks' ``TMPDIR`` meanwhile, removed at the end.

    kfp.local's subprocess runner starts every task with ``program_path=$(mktemp -d)`` and
    never removes it: one folder per task, nine a run, hundreds in a day. Under a directory we
    own they go with the run (and, if this process is killed, at the next start:
    ``kubetrain.core.io.clean_stale_temp_dirs``). torch's compile cache stays where it was, or
    every run would compile from scratch: ``TORCHINDUCTOR_CACHE_DIR`` names it, and a link of
    the same name in our directory leads there too, because inductor (torch 2.13/2.14) puts its
    precompiled C++ header beside ``tempfile.gettempdir()`` whatever that variable says
    (rebuilding it cost each inductor step about 7 s).
    """
    import getpass
    import os
    import re
    import tempfile

    from kubetrain.core.io import make_temp_dir

    # torch's own name for the cache (torch._inductor.runtime.cache_dir_utils.default_cache_dir)
    try:
        user = getpass.getuser()
    except (KeyError, ModuleNotFoundError, OSError):  # no user name in a bare container
        user = f"uid_{os.getuid()}"
    inductor = Path(tempfile.gettempdir(), "torchinductor_" + re.sub(r'[\\/:*?"<>|]', "_", user))
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    if saved["TORCHINDUCTOR_CACHE_DIR"] is None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor)
    tmp = make_temp_dir("tasks")
    with contextlib.suppress(OSError):  # a cache it cannot share is only slower
        inductor.mkdir(parents=True, exist_ok=True)
        (tmp / inductor.name).symlink_to(inductor, target_is_directory=True)
    os.environ["TMPDIR"] = str(tmp)
    try:
        yield tmp
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _output_into(stream: IO[str] | io.TextIOBase) -> Iterator[None]:
    """Send this process's stdout, stderr and root-logger records to ``stream`` meanwhile
    (kfp.local prints to stdout and logs through the root logger), and hand back the
    ``print`` it found.

    kfp.local 2.17 indents each task's output by swapping ``builtins.print`` for the task's
    run and back; a ParallelFor's iterations run on threads, so one can put back the other's
    indenting ``print``, and every later line of this process would start with spaces.
    """
    import builtins

    root = logging.getLogger()
    handlers = root.handlers[:]
    original_print = builtins.print
    handler = logging.StreamHandler(stream)
    if handlers and handlers[0].formatter is not None:
        handler.setFormatter(handlers[0].formatter)
    root.handlers[:] = [handler]
    try:
        with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream):
            yield
    finally:
        root.handlers[:] = handlers
        builtins.print = original_print


def _step_failure(task_log: Any, err: RuntimeError, run_dir: Path, out: IO[str] | None):
    """What ``kubetrain run`` reports for a failed pipeline: the failing step's own line (its
    ERROR_MARKER record) or else its last log line, with its log path. Its last lines go to
    ``out`` (unless None: they were streamed already)."""
    failed = task_log.failed()
    if failed is None:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "a task failed"
        return StepFailed(f"pipeline failed: {first} (log: {task_log.combined_path})")
    log_file = failed.log_file or task_log.combined_path
    if out is not None and failed.tail:
        out.write(f"last lines of {failed.name} ({log_file}):\n")
        out.writelines(f"  {line}\n" for line in failed.tail)
        out.flush()
    if failed.error is not None:
        message = failed.error.get("message", "failed")
        code = int(failed.error.get("exit_code", 1))
        return StepFailed(f"{failed.name}: {message} (log: {log_file})", code, failed.name)
    last = failed.tail[-1] if failed.tail else "no output"
    return StepFailed(
        f"{failed.name} failed: {last} (log: {log_file}; outputs so far in {run_dir / 'kfp'})",
        step=failed.name,
    )


def task_names(pipeline: Any) -> list[str]:
    """The pipeline's tasks (those inside conditions too), each after the tasks it needs.

    Args:
        pipeline: a compiled ``@dsl.pipeline`` (its ``pipeline_spec``).

    Returns:
        Task names, e.g. ``["preprocess", "tune", ..., "promote", "reject"]``.
    """
    spec = pipeline.pipeline_spec
    needs: dict[str, list[str]] = {}
    groups: dict[str, list[str]] = {}  # a group task (a condition, a loop) -> its tasks

    def collect(dag: Any, inherited: list[str]) -> list[str]:
        leaves = []
        for name, task in sorted(dag.tasks.items()):  # a protobuf map's order is not stable
            component = spec.components[task.component_ref.name]
            after = [*inherited, *task.dependent_tasks]
            if component.WhichOneof("implementation") == "dag":
                groups[name] = collect(component.dag, after)
                leaves += groups[name]
            else:
                needs[name] = after
                leaves.append(name)
        return leaves

    collect(spec.root.dag, [])
    for name, after in needs.items():  # after a group: after every task in it
        needs[name] = [leaf for d in after for leaf in groups.get(d, [d])]
    ordered: list[str] = []
    while len(ordered) < len(needs):
        waiting = [n for n in needs if n not in ordered]
        ready = [n for n in waiting if all(d in ordered or d not in needs for d in needs[n])]
        ordered.extend(ready or waiting)  # a cycle cannot happen in KFP; never loop forever
    return ordered


def task_instances(pipeline: Any) -> dict[str, int]:
    """How many times each task inside a ``dsl.ParallelFor`` over a fixed list runs (its
    iterations, nested loops multiplied); tasks that run once are not listed.

    Args:
        pipeline: a compiled ``@dsl.pipeline`` (its ``pipeline_spec``).
    """
    import json

    spec = pipeline.pipeline_spec
    counts: dict[str, int] = {}

    def collect(dag: Any, times: int) -> None:
        for name, task in dag.tasks.items():
            component = spec.components[task.component_ref.name]
            runs = times
            if task.WhichOneof("iterator") == "parameter_iterator":
                raw = task.parameter_iterator.items.raw
                runs *= len(json.loads(raw)) if raw else 1
            if component.WhichOneof("implementation") == "dag":
                collect(component.dag, runs)
            elif runs > 1:
                counts[name] = runs

    collect(spec.root.dag, 1)
    return counts


def _find_output(pipeline_root: Path, task: str, output: str) -> Path | None:
    """The newest ``<pipeline_root>/<run>/<task>/<output>`` (kfp.local's layout)."""
    found = sorted(pipeline_root.glob(f"*/{task}/{output}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
