"""``kubetrain submit`` / ``kubetrain schedule``: the pipeline on a Kubeflow Pipelines server.

Both compile the pipeline for the given config (the same IR ``kubetrain compile`` writes) and
hand it to ``kfp.Client``. A recurring run cannot be updated in KFP, so ``schedule`` replaces one
of the same name: it creates the new one first and then deletes the old ones, so a failure never
leaves the pipeline unscheduled.
"""

from __future__ import annotations

import json
import logging
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetrain.config import PipelineConfig
from kubetrain.errors import KubetrainError

log = logging.getLogger(__name__)

HEALTHZ = "/apis/v2beta1/healthz"


@dataclass
class Submitted:
    """What the server created: its id, the experiment, and links for the UI."""

    kind: str  # "run" | "recurring run"
    id: str
    name: str
    experiment_id: str
    replaced: list[str]


def check_cron(cron: str) -> str:
    """KFP's cron has six fields, seconds first; raise a one-line error otherwise."""
    fields = cron.split()
    if len(fields) != 6:
        raise KubetrainError(
            f"--cron {cron!r}: KFP expects six fields, seconds first "
            "(e.g. '0 0 3 * * *' for 03:00 every day)"
        )
    return " ".join(fields)


def _server_info(host: str) -> dict[str, Any]:
    """GET healthz: is it a KFP API server, and is it multi-user? One line if not reachable."""
    url = host.rstrip("/") + HEALTHZ
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        raise KubetrainError(
            f"--host {host}: not a Kubeflow Pipelines API (GET {HEALTHZ}: HTTP {err.code})"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise KubetrainError(
            f"cannot reach the Kubeflow Pipelines API at {host}: {reason}"
        ) from None


class Pipelines:
    """A ``kfp.Client`` for ``host``; every API failure becomes one ``KubetrainError`` line."""

    def __init__(self, host: str, namespace: str):
        import warnings

        info = _server_info(host)
        self.host = host.rstrip("/")
        # Multi-user KFP keeps experiments per profile namespace; single-user has none.
        self.namespace = namespace if info.get("multi_user") else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
            import kfp

            self.client = kfp.Client(host=self.host, namespace=self.namespace or "kubeflow")

    def _call(self, what: str, fn, *args, **kwargs):
        from kfp_server_api.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as err:
            message = err.reason
            try:
                body = json.loads(err.body or "")
                message = body.get("message") or body.get("error") or message
            except (TypeError, ValueError):
                pass
            raise KubetrainError(
                f"Kubeflow Pipelines at {self.host}: cannot {what}: HTTP {err.status}: {message}"
            ) from None
        except OSError as err:  # urllib3 connection errors
            raise KubetrainError(
                f"Kubeflow Pipelines at {self.host}: cannot {what}: {type(err).__name__}: {err}"
            ) from None

    def experiment_id(self, name: str) -> str:
        exp = self._call(
            f"create or find experiment {name!r}", self.client.create_experiment, name=name,
            namespace=self.namespace,
        )  # fmt: skip
        return exp.experiment_id

    def recurring_runs_named(self, name: str, experiment_id: str) -> list[str]:
        flt = json.dumps(
            {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
        )
        ids, token = [], ""
        while True:
            page = self._call(
                "list recurring runs", self.client.list_recurring_runs, page_token=token,
                page_size=100, experiment_id=experiment_id, filter=flt,
            )  # fmt: skip
            ids += [r.recurring_run_id for r in page.recurring_runs or [] if r.display_name == name]
            token = page.next_page_token
            if not token:
                return ids


def compile_package(cfg: PipelineConfig, directory: Path) -> Path:
    """Compile the pipeline of ``cfg`` to ``directory/kubetrain.yaml``."""
    from kfp import compiler

    from kubetrain.pipelines import build_pipeline

    path = directory / "kubetrain.yaml"
    compiler.Compiler().compile(build_pipeline(cfg), str(path))
    return path


def submit_run(
    cfg: PipelineConfig, host: str, experiment: str, run_name: str | None = None
) -> Submitted:
    """Compile and start one run of the pipeline in ``experiment`` (created if missing)."""
    kfp = Pipelines(host, cfg.cluster.namespace)
    with tempfile.TemporaryDirectory(prefix="kubetrain-") as tmp:
        package = compile_package(cfg, Path(tmp))
        exp_id = kfp.experiment_id(experiment)
        name = run_name or f"kubetrain {cfg.model.name} {cfg.data.source}"
        run = kfp._call(
            "create the run", kfp.client.run_pipeline, experiment_id=exp_id, job_name=name,
            pipeline_package_path=str(package),
            params={"min_accuracy": cfg.evaluate.min_accuracy},
        )  # fmt: skip
    return Submitted("run", run.run_id, name, exp_id, [])


def schedule_run(
    cfg: PipelineConfig, host: str, name: str, cron: str, experiment: str
) -> Submitted:
    """Create the recurring run ``name``; recurring runs of that name are replaced."""
    cron = check_cron(cron)
    kfp = Pipelines(host, cfg.cluster.namespace)
    with tempfile.TemporaryDirectory(prefix="kubetrain-") as tmp:
        package = compile_package(cfg, Path(tmp))
        exp_id = kfp.experiment_id(experiment)
        old = kfp.recurring_runs_named(name, exp_id)
        job = kfp._call(
            f"create recurring run {name!r}", kfp.client.create_recurring_run,
            experiment_id=exp_id, job_name=name, cron_expression=cron,
            pipeline_package_path=str(package),
            params={"min_accuracy": cfg.evaluate.min_accuracy},
            max_concurrency=1, no_catchup=True, enabled=True,
        )  # fmt: skip
    for old_id in old:
        kfp._call(
            f"delete the old recurring run {old_id}", kfp.client.delete_recurring_run,
            recurring_run_id=old_id,
        )  # fmt: skip
        log.info("replaced recurring run %s (%s)", name, old_id)
    return Submitted("recurring run", job.recurring_run_id, name, exp_id, old)
