"""``kubetrain run``: the whole pipeline on this machine under KFP's local runner.

Every step runs as a KFP task: with the ``subprocess`` runner a subprocess of this interpreter
(exactly the component code a cluster runs), with the ``docker`` runner a container of the
runtime image (``kubetrain.images``), as on a cluster. Caching makes a re-run into the same
directory skip finished steps.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from kubetrain.config import PipelineConfig
from kubetrain.errors import ConfigError, KubetrainError
from kubetrain.io import read_json, write_json
from kubetrain.warm import StepServer
from kubetrain.warm import enabled as warm_enabled

log = logging.getLogger(__name__)

MARKER = ".kubetrain-run"
RUNNERS = ("subprocess", "docker")


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    report: Path
    promoted_model: Path | None
    seconds: float
    retrained: bool = True  # False: retrain.only_if_changed found nothing new
    reason: str = ""


def preflight(cfg: PipelineConfig) -> None:
    """Check what can be checked before anything is written: data readable, model fits it."""
    from kubetrain.data.sources import load_source

    if cfg.cluster.backend != "local":
        raise KubetrainError(
            "cluster.backend 'kubernetes' is for cluster runs; `kubetrain run` runs locally "
            "(use cluster.backend=local)"
        )
    raw = load_source(cfg.data)
    if cfg.model.name == "cnn" and raw.image_shape is None:
        raise ConfigError(
            "config error: model.name: 'cnn' needs image data; set data.image_shape (C,H,W) "
            "for images stored as columns, or use 'mlp'"
        )


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
    from kubetrain.io import check_writable_dir

    run_dir = output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    check_writable_dir(run_dir, "--output" if output is not None else "run directory")
    if run_dir.exists() and any(run_dir.iterdir()) and not (run_dir / MARKER).exists():
        raise KubetrainError(
            f"{run_dir}: exists, is not empty and is not a kubetrain run directory; "
            "choose another --output"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / MARKER).touch()
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

    from kubetrain.images import runtime_image

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
    warm: bool = True,
) -> RunResult:
    """Run the pipeline under kfp.local (``runner``: one of RUNNERS); return metrics and paths.

    With the subprocess runner and ``warm``, the steps fork from one step server that imported
    their libraries once (``kubetrain.warm``); each task is still its own KFP subprocess.
    """
    if runner not in RUNNERS:
        raise KubetrainError(f"runner {runner!r}: expected one of {', '.join(RUNNERS)}")
    preflight(cfg)
    run_dir = prepare_run_dir(output)
    with contextlib.ExitStack() as stack:
        if runner == "subprocess" and warm and warm_enabled():
            # Started first: its imports overlap the compile and the first task.
            stack.enter_context(StepServer(run_dir / "kfp" / "step-server.log"))
        task, started = _run_pipeline(cfg, run_dir, cache, runner)
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
        promoted = bool(read_json(evaluation / "metrics.json")["promoted"])
    else:
        evaluation = Path(task.outputs["evaluation"].path)
        promoted = bool(task.outputs["promoted"])
    metrics = read_json(evaluation / "metrics.json")
    metrics["promoted"] = promoted
    metrics["pipeline_seconds"] = seconds
    write_json(run_dir / "metrics.json", metrics)
    shutil.copyfile(evaluation / "report.html", run_dir / "report.html")
    promoted_dir = _find_output(run_dir / "kfp", "promote", "promoted") if promoted else None
    return RunResult(run_dir, metrics, run_dir / "report.html", promoted_dir, seconds)


def _run_pipeline(
    cfg: PipelineConfig, run_dir: Path, cache: bool, runner: str
) -> tuple[Any, float]:
    """Compile and run the pipeline under kfp.local; the final task and the start time."""
    from kfp import local

    from kubetrain.pipelines import build_pipeline

    if cfg.train.checkpoint_dir is None:
        # A stable place, so a re-run after a failed train step resumes from its checkpoints
        # (under the pipeline root, which the docker runner mounts too).
        cfg = cfg.with_params({"train.checkpoint_dir": str(run_dir / "kfp" / "checkpoints")})
    pipeline = build_pipeline(cfg)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
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
    started = time.perf_counter()
    with warnings.catch_warnings():
        # kfp warns for every task whose base image name lacks "python"; ours is a Python image.
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        try:
            task = pipeline(min_accuracy=cfg.evaluate.min_accuracy)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else "a task failed"
            raise KubetrainError(
                f"pipeline failed: {first} (the task's log above says why; outputs so far are "
                f"in {run_dir / 'kfp'})"
            ) from None
    return task, started


def _find_output(pipeline_root: Path, task: str, output: str) -> Path | None:
    """The newest ``<pipeline_root>/<run>/<task>/<output>`` (kfp.local's layout)."""
    found = sorted(pipeline_root.glob(f"*/{task}/{output}"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
