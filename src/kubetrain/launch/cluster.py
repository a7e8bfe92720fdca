"""One lifecycle for everything kubetrain runs on a cluster: submit, wait, logs, explain, clean up.

The train backend (a ``TrainJob``, ``kubetrain.launch.trainjob``, or a ``PyTorchJob``,
``kubetrain.launch.kubernetes``) and the tune backend (a Katib ``Experiment``,
``kubetrain.tune.katib``) differ only in the object they build and in a
``Watcher`` that knows how to read it (its pods and logs, how to explain its failure). The rest
is here, once:

- **submit**: the dataset goes to the shared claim (``JobPaths``), the object is created once;
- **wait**: list the object (its resourceVersion) and watch it from there in windows of
  ``cluster.poll_seconds``; a watch that ends is resumed, a 410 Gone restarts from a fresh
  list, and an API server that goes away (restarts, network, the moments after a restart when
  it still refuses valid tokens) is waited for up to ``OUTAGE_SECONDS`` with a warning: the
  same object is watched again, nothing is created twice;
- **queue**: a job that a queue (Kueue) holds suspended is ``waiting in queue <name>`` in the
  log, not running; ``cluster.wait_timeout_seconds`` counts the time in the queue too;
- **explain**: the object's own ``Failed`` condition plus what the watcher saw, in one line;
- **clean up**: per ``cluster.cleanup``, the object and its directory on the claim.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

from kubetrain.core.errors import KubetrainError
from kubetrain.launch.config import JobConfig
from kubetrain.launch.kubeapi import KubeApi, KubeApiError, Resource

log = logging.getLogger(__name__)

# How long a wait rides out an unreachable API server (a restart, a network blip) before it
# gives up; never beyond cluster.wait_timeout_seconds.
OUTAGE_SECONDS = 120.0
# Answers that mean "not now" rather than "no": 0 is no answer at all.
TRANSIENT = (0, 429, 500, 502, 503, 504)
T = TypeVar("T")


class JobFailed(KubetrainError):
    """The object ran and failed (as opposed to: could not start, or was not waited for)."""


@dataclass(frozen=True)
class JobPaths:
    """Where one job's files live on the shared claim (``cluster.mount_path``)."""

    root: str
    dataset: str
    model: str
    checkpoints: str

    @classmethod
    def for_job(cls, cfg: JobConfig, name: str) -> JobPaths:
        """The paths of job ``name`` under ``cluster.mount_path``/jobs."""
        root = PurePosixPath(cfg.cluster.mount_path) / "jobs" / name
        return cls(str(root), str(root / "dataset"), str(root / "model"), str(root / "checkpoints"))


def new_name(cfg: JobConfig, kind: str) -> str:
    """A fresh object name: ``<cluster.name_prefix>-<kind>-<6 hex>`` (a DNS-1035 label)."""
    return f"{cfg.cluster.name_prefix}-{kind}-{secrets.token_hex(3)}"


def condition(obj: dict[str, Any], *types: str) -> tuple[str | None, str]:
    """The first true status condition of one of ``types``.

    Args:
        obj: a PyTorchJob, Experiment or Trial as the API returns it.
        types: condition types to look for (``"Succeeded"``, ``"Failed"``, ...).

    Returns:
        (the condition's type or None, ``"reason: message"`` of it or "").
    """
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("status") == "True" and cond.get("type") in types:
            text = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
            return cond["type"], text or cond["type"]
    return None, ""


def should_delete(cleanup: str, succeeded: bool, finished: bool) -> bool:
    """The ``cluster.cleanup`` rule; an object we stopped watching (not finished) is removed."""
    if cleanup == "never":
        return False
    if cleanup == "always" or not finished:
        return True
    return succeeded


class Watcher(Protocol):
    """What one kind of object adds to the lifecycle (pods and logs, progress, explanations)."""

    resource: Resource
    success: str
    """The condition type that means the object succeeded (``Succeeded``, ``Complete``)."""

    def suspended(self, obj: dict[str, Any]) -> bool:
        """Whether the object is suspended (held in a queue until admitted)."""

    def observe(self, api: KubeApi, obj: dict[str, Any]) -> None:
        """Called on every change and at least every window; raises KubetrainError for a
        problem that will not heal (e.g. an image that cannot be pulled)."""

    def explain(self, what: str, reason: str) -> str:
        """The one-line failure message of ``what`` whose Failed condition says ``reason``."""

    def close(self) -> None:
        """The wait is over: stop following logs."""


class ClusterJob:
    """Submit one object, wait for it (watch), delete it; every failure is one line."""

    def __init__(self, cfg: JobConfig, api: KubeApi, watcher: Watcher):
        self.cfg = cfg
        self.api = api
        self.watcher = watcher
        self.resource = watcher.resource
        self.queue = _Queue(cfg.cluster.queue_name)
        self._last: dict[str, Any] | None = None  # the object as last seen

    def what(self, name: str) -> str:
        """``"pytorchjob NAMESPACE/NAME"``: how every message names the object."""
        return self.resource.describe(self.api.namespace, name)

    def submit(self, body: dict[str, Any]) -> str:
        """Create ``body``; returns its name. Raises KubeApiError (409 if the name is taken)."""
        self.api.create(self.resource, body)
        name = body["metadata"]["name"]
        log.info("submitted %s", self.what(name))
        return name

    def wait(self, name: str, since: str | None = None) -> dict[str, Any]:
        """Block until the object succeeds and return it.

        Args:
            name: the object's name.
            since: a resourceVersion to resume watching from (a reattaching caller's last
                one); None: start from a fresh list.

        Raises:
            JobFailed: it failed (the message has its reason and what the watcher saw).
            KubetrainError: it cannot start, vanished, or did not finish within
                ``cluster.wait_timeout_seconds``; or the API server stayed away.
        """
        cl = self.cfg.cluster
        deadline = time.monotonic() + cl.wait_timeout_seconds
        outage = _Outage(self.api.host)
        self.queue = _Queue(cl.queue_name)
        version = since
        try:
            while True:
                try:
                    done, version = self._watch_window(name, version, deadline)
                    if done is not None:
                        return done
                    outage.over()
                except KubeApiError as err:
                    if err.status == 410:  # the version expired: resume from a fresh list
                        log.info("watch of %s expired; listing it again", self.what(name))
                        version = None
                        continue
                    outage.record(err, self.what(name))  # raises unless it is worth waiting
                    time.sleep(min(cl.poll_seconds, 1.0))
                    version = None
                # The one place the deadline is checked, outage or not: one message for it.
                if time.monotonic() >= deadline:
                    raise KubetrainError(
                        f"{self.what(name)} did not finish within cluster.wait_timeout_seconds = "
                        f"{cl.wait_timeout_seconds}{self.queue.describe()}{outage.describe()}"
                    )
        finally:
            self.watcher.close()

    def _watch_window(
        self, name: str, version: str | None, deadline: float
    ) -> tuple[dict[str, Any] | None, str]:
        """One watch window (``cluster.poll_seconds``, from a fresh list if ``version`` is None).

        Returns (the object if it succeeded, else None; the resourceVersion to resume from).
        """
        if version is None:  # the state now, and where to watch from
            obj, version = self.api.read(self.resource, name)
            if (done := self._check(name, obj)) is not None:
                return done, version
        window = max(1, round(self.cfg.cluster.poll_seconds))
        left = max(1, min(window, round(deadline - time.monotonic())))
        for kind, obj in self.api.watch(self.resource, name, version, left):
            version = obj.get("metadata", {}).get("resourceVersion") or version
            if kind == "BOOKMARK":
                continue
            done = self._check(name, None if kind == "DELETED" else obj)
            if done is not None:
                return done, version
        # A window without a change of the object still looks at its pods: a pod that cannot
        # pull its image changes nothing in the job's own status.
        if self._last is not None:
            self._check(name, self._last)
        return None, version

    def _check(self, name: str, obj: dict[str, Any] | None) -> dict[str, Any] | None:
        if obj is None:
            raise KubetrainError(f"{self.what(name)} was deleted while kubetrain waited for it")
        self._last = obj
        self.queue.update(self.watcher.suspended(obj), self.what(name))
        self.watcher.observe(self.api, obj)
        kind, text = condition(obj, self.watcher.success, "Failed")
        if kind == self.watcher.success:
            return obj
        if kind == "Failed":
            raise JobFailed(self.watcher.explain(self.what(name), text))
        return None

    def delete(self, name: str) -> None:
        """Delete the object (its pods go with it); a failure is a warning, not an error."""
        try:
            if self.api.delete(self.resource, name):
                log.info("deleted %s", self.what(name))
        except KubeApiError as err:
            log.warning("could not delete %s: %s", self.what(name), err)


class _Queue:
    """Whether a job is held suspended (by Kueue, in ``cluster.queue_name``), said once per
    change: ``waiting in queue <name>``, then ``admitted``."""

    def __init__(self, name: str):
        self.name = name
        self.since: float | None = None

    @property
    def where(self) -> str:
        return f"queue {self.name}" if self.name else "a queue (it is suspended)"

    def update(self, suspended: bool, what: str) -> None:
        """The job's state now."""
        if suspended and self.since is None:
            self.since = time.monotonic()
            log.info("%s: waiting in %s", what, self.where)
        elif not suspended and self.since is not None:
            log.info(
                "%s: admitted from %s after %.0f s", what, self.where, time.monotonic() - self.since
            )
            self.since = None

    def describe(self) -> str:
        """`` (waiting in queue Q for N s: not admitted)`` while held, else ""."""
        if self.since is None:
            return ""
        return (
            f" (waiting in {self.where} for {time.monotonic() - self.since:.0f} s: not admitted; "
            "is the queue's quota large enough for the job?)"
        )


class _Outage:
    """How long the API server has been away during a wait; raises once that is too long.

    It enforces ``OUTAGE_SECONDS`` only: ``ClusterJob.wait`` owns the wait's deadline, so that
    a wait that runs out says so in one message whether the server answers or not.
    """

    def __init__(self, host: str):
        self.host = host
        self.since: float | None = None

    def record(self, err: KubeApiError, what: str) -> None:
        """A failed call; raises ``err`` unless it means "not now" and the outage is not yet
        ``OUTAGE_SECONDS`` long.

        "Not now": no answer, overloaded, or, while the server is coming back, 401/403 (until
        its caches fill, a restarted API server refuses valid tokens and roles).
        """
        starting = self.since is not None and err.status in (401, 403)
        if err.status not in TRANSIENT and not starting:
            raise err
        now = time.monotonic()
        if self.since is None:
            self.since = now
            log.warning("%s; waiting for it to come back", err)
        if now - self.since >= OUTAGE_SECONDS:
            raise KubeApiError(
                f"{err} (no usable answer for {now - self.since:.0f} s while waiting for {what})"
            ) from None

    def describe(self) -> str:
        """`` (the API server at H has not answered for N s)`` during an outage, else ""."""
        if self.since is None:
            return ""
        return (
            f" (the API server at {self.host} has not answered for "
            f"{time.monotonic() - self.since:.0f} s)"
        )

    def over(self) -> None:
        """A call succeeded."""
        if self.since is not None:
            log.warning("the API server at %s answers again", self.host)
            self.since = None


def check_claim(cfg: JobConfig, kind: str = "job") -> None:
    """Raise KubetrainError unless the shared claim is mounted here (``cluster.mount_path``):
    before anything is asked of the cluster."""
    mount = Path(cfg.cluster.mount_path)
    if not mount.is_dir():
        raise KubetrainError(
            f"cluster.mount_path {mount} does not exist here: the step that creates "
            f"{kind} objects must mount PVC '{cfg.cluster.pvc_name}' there "
            "(the pipeline does this on a cluster)"
        )


def run_job(
    cfg: JobConfig,
    api: KubeApi,
    watcher: Watcher,
    body: dict[str, Any],
    dataset_dir: Path,
    collect: Callable[[ClusterJob, dict[str, Any], JobPaths], T],
) -> T:
    """The whole lifecycle of one object: claim, submit, wait, collect, clean up.

    Args:
        cfg: the pipeline config (``cluster.*`` decides waiting and cleanup).
        api: the client of ``cluster.namespace``.
        watcher: the kind's watcher.
        body: the object to create (its name decides ``JobPaths``).
        dataset_dir: the dataset artifact, copied to the claim for the pods.
        collect: reads the result once the object succeeded (e.g. copies the model back).

    Returns:
        What ``collect`` returns.

    Raises:
        KubetrainError: the claim is not mounted here, the job's directory on it exists or
            the dataset cannot be copied there, the namespace is missing, the API refused the
            object, the object failed or was not waited for.
    """
    name = body["metadata"]["name"]
    paths = JobPaths.for_job(cfg, name)
    check_claim(cfg, watcher.resource.kind)
    api.check_namespace()
    if Path(paths.root).exists():  # not ours to overwrite, nor to remove below
        raise KubetrainError(
            f"{paths.root} already exists on the claim: another job of the name "
            f"{name}? Remove it or retry (names are random)"
        )
    job = ClusterJob(cfg, api, watcher)
    submitted = succeeded = finished = False
    try:
        # Inside the try: a copy that fails half-way (disk full) leaves nothing on the claim.
        try:
            shutil.copytree(dataset_dir, paths.dataset)
        except OSError as err:  # shutil.Error (one per file) is an OSError too
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KubetrainError(
                f"cannot copy the dataset {dataset_dir} to {paths.dataset} on the claim: "
                f"{type(err).__name__}: {first[:300]}"
            ) from None
        job.submit(body)
        submitted = True
        try:
            obj = job.wait(name)
            finished = True
        except JobFailed:
            finished = True
            raise
        result = collect(job, obj, paths)
        succeeded = True
        return result
    finally:
        delete = should_delete(cfg.cluster.cleanup, succeeded, finished)
        if submitted and delete:
            job.delete(name)
        if not submitted or delete:
            shutil.rmtree(paths.root, ignore_errors=True)
