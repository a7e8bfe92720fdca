"""``kubetrain submit`` / ``kubetrain schedule``: the pipeline on a Kubeflow Pipelines server.

Both compile the pipeline for the given config (the same IR ``kubetrain compile`` writes) and
hand it to ``kfp.Client``. ``--set`` items become run-time parameters of the run (see
``kubetrain.pipeline.params``: ``data_source``, ``train_epochs``, ``tune_max_trials``, ``min_accuracy``,
``overrides``), visible and editable in the KFP UI; only the keys that shape the pipeline itself
(``params.COMPILE_TIME_KEYS``) are compiled in. A recurring run cannot be updated in KFP, so ``schedule`` replaces one
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

from kubetrain.core.errors import KubetrainError
from kubetrain.pipeline.config import PipelineConfig, load_config
from kubetrain.pipeline.params import SCHEDULE_PLACEHOLDER, pipeline_arguments, split_sets

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


def compile_pipeline(cfg: PipelineConfig, path: Path) -> Path:
    """Compile the pipeline of ``cfg`` for a KFP backend to ``path`` (IR YAML).

    The ``params`` task gets KFP's scheduled-time placeholder, which the backend resolves
    (``{date}`` in ``data.source``); kfp.local runs build the pipeline without it. The config
    is inlined in the pipeline spec: credentials in it are refused (ConfigError).
    """
    from kfp import compiler

    from kubetrain.launch.kubernetes import check_no_inline_credentials
    from kubetrain.pipelines import build_pipeline

    check_no_inline_credentials(cfg)

    compiler.Compiler().compile(build_pipeline(cfg, SCHEDULE_PLACEHOLDER), str(path))
    return path


def compile_package(cfg: PipelineConfig, directory: Path) -> Path:
    """Compile the pipeline of ``cfg`` to ``directory/kubetrain.yaml``."""
    return compile_pipeline(cfg, directory / "kubetrain.yaml")


@dataclass
class Request:
    """What to compile and what to send: the compiled config and the run's parameters."""

    cfg: PipelineConfig  # compiled: the config file and the compile-time --set keys
    params: dict[str, Any]  # the run's parameters (min_accuracy always)
    effective: PipelineConfig  # everything applied: what the run will use (before {date})


def request(config: str | Path | None, sets: list[str] | tuple[str, ...] = ()) -> Request:
    """Split ``--set`` items into the compiled config and run-time parameters, validating the
    whole (raises ConfigError: the same one line a step would fail with)."""
    compiled, params = split_sets(sets)
    effective = load_config(config, list(sets))
    cfg = load_config(config, compiled)
    return Request(cfg, pipeline_arguments(cfg, params), effective)


def submit_run(req: Request, host: str, experiment: str, run_name: str | None = None) -> Submitted:
    """Compile and start one run of the pipeline in ``experiment`` (created if missing)."""
    cfg = req.cfg
    kfp = Pipelines(host, cfg.cluster.namespace)
    with tempfile.TemporaryDirectory(prefix="kubetrain-") as tmp:
        package = compile_package(cfg, Path(tmp))
        exp_id = kfp.experiment_id(experiment)
        name = run_name or f"kubetrain {req.effective.model.name} {req.effective.data.source}"
        run = kfp._call(
            "create the run", kfp.client.run_pipeline, experiment_id=exp_id, job_name=name,
            pipeline_package_path=str(package), params=req.params,
        )  # fmt: skip
    return Submitted("run", run.run_id, name, exp_id, [])


def schedule_run(req: Request, host: str, name: str, cron: str, experiment: str) -> Submitted:
    """Create the recurring run ``name``; recurring runs of that name are replaced."""
    cron = check_cron(cron)
    cfg = req.cfg
    kfp = Pipelines(host, cfg.cluster.namespace)
    with tempfile.TemporaryDirectory(prefix="kubetrain-") as tmp:
        package = compile_package(cfg, Path(tmp))
        exp_id = kfp.experiment_id(experiment)
        old = kfp.recurring_runs_named(name, exp_id)
        job = kfp._call(
            f"create recurring run {name!r}", kfp.client.create_recurring_run,
            experiment_id=exp_id, job_name=name, cron_expression=cron,
            pipeline_package_path=str(package), params=req.params,
            max_concurrency=1, no_catchup=True, enabled=True,
        )  # fmt: skip
    for old_id in old:
        kfp._call(
            f"delete the old recurring run {old_id}", kfp.client.delete_recurring_run,
            recurring_run_id=old_id,
        )  # fmt: skip
        log.info("replaced recurring run %s (%s)", name, old_id)
    return Submitted("recurring run", job.recurring_run_id, name, exp_id, old)
