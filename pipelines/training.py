"""preprocess -> tune -> train -> quantize -> evaluate -> [promote | reject].

The pipeline is built from a config: each step receives only the config sections it uses, so a
change to, say, ``quantize.method`` re-runs quantize and evaluate and takes the rest from cache.
Run-time parameters (``kubetrain.pipeline.params``) change a run without recompiling: ``min_accuracy``
(the promotion bar), ``data_source``, ``train_epochs``, ``tune_max_trials`` and ``overrides`` (any
dotted config keys, a JSON object). A first ``params`` task merges them into the config and hands
each step the overrides of its own sections, so caching still keys on what a step uses.

With ``retrain.only_if_changed`` a ``check-changed`` step after preprocess compares the
fingerprint of data and config with the last promoted model (``kubetrain.registry``); everything
after it runs only if they differ, and the pipeline's output is that decision.

With ``tracking.mlflow_uri`` a ``track`` task after the gate logs the run to MLflow
(``kubetrain.tracking``).

Every task's pod is sized from ``cluster.steps`` and runs ``cluster.image`` (``_step``).

With ``data.parallel_tasks`` N > 1, preprocess is three kinds of task (``_preprocess``): a plan, N
convert tasks in a ``dsl.ParallelFor`` (``data.max_parallel_tasks`` at once, each retried
``data.convert_retries`` times, each pod sized by ``cluster.steps.preprocess_convert``) and a merge
over their ``dsl.Collected`` parts, whose dataset is the one-task preprocess's, byte for byte.

On ``cluster.backend: kubernetes`` the tune and train steps launch a Katib Experiment and a
TrainJob or PyTorchJob (``cluster.training_api``); they (and the registry steps) mount ``cluster.pvc_name`` at ``cluster.mount_path``,
through which datasets and models travel to the job pods.

(No ``from __future__ import annotations`` here: KFP reads the annotations as real types.)
"""

from typing import NamedTuple

from kfp import dsl

from kubetrain import components as c
from kubetrain.pipeline import steps
from kubetrain.pipeline.config import PipelineConfig
from kubetrain.pipeline.params import STEP_SECTIONS

PIPELINE_NAME = "kubetrain"
DESCRIPTION = (
    "Tune, train (DDP), quantize (int8) and evaluate a model; promote it if it clears the "
    "accuracy bar."
)


# What the KFP UI shows for each task (its taskInfo.name); kfp.local's logs and `kubetrain run`'s
# task view use the task keys (preprocess, run-params, ...) instead.
DISPLAY_NAMES = {
    "run-params": "Run parameters",
    "preprocess": "Preprocess: read, split, normalise",
    "preprocess-plan": "Preprocess: list, split, plan the shards",
    "preprocess-convert": "Preprocess: convert a range of shards",
    "preprocess-merge": "Preprocess: check and merge the ranges",
    "check-changed": "Check for new data or config",
    "tune": "Hyperparameter search",
    "train": "Train (DDP)",
    "quantize": "Quantize to int8",
    "evaluate": "Evaluate fp32 vs int8",
    "check-accuracy": "Accuracy gate",
    "promote": "Promote the model",
    "reject": "Reject the model",
    "track": "Log to MLflow",
}


def _step(cfg: PipelineConfig, task, name: str):
    """Name the task in the UI and size its pod for a KFP server: the image of
    ``cluster.image`` (the job pods' too), CPU/memory requests and limits, GPUs, node selector
    and tolerations from ``cluster.steps`` (its default, then the step's own entry). kfp.local
    runs the task in this Python and ignores the pod settings."""
    task.set_display_name(DISPLAY_NAMES[name])
    if cfg.cluster.image:
        task.set_container_image(cfg.cluster.image)
    pod = cfg.cluster.step_pod(name)
    task.set_cpu_request(pod.cpu).set_cpu_limit(pod.cpu_limit or pod.cpu)
    task.set_memory_request(pod.memory).set_memory_limit(pod.memory)
    if pod.gpus:
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(pod.gpus)
    if pod.node_selector or pod.tolerations:
        from kfp import kubernetes

        for key, value in (pod.node_selector or {}).items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for t in pod.tolerations or []:
            kubernetes.add_toleration(
                task, key=t.key or None, operator=t.operator, value=t.value or None,
                effect=t.effect or None,
            )  # fmt: skip
    return task


def _on_claim(cfg: PipelineConfig, task):
    """Mount the cluster's shared claim into a task that hands files to cluster jobs."""
    if cfg.cluster.backend == "kubernetes":
        from kfp import kubernetes

        kubernetes.mount_pvc(task, pvc_name=cfg.cluster.pvc_name, mount_path=cfg.cluster.mount_path)
    return task


# What s3fs reads from the environment; the endpoint may also be data.storage_options.endpoint_url.
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _with_storage_secret(cfg: PipelineConfig, task):
    """Object-storage credentials from ``cluster.storage_secret`` for a task that reads data
    (the job pods get every key of the Secret; see kubetrain.launch.kubernetes)."""
    if cfg.cluster.storage_secret:
        from kfp import kubernetes

        keys = {k: k for k in STORAGE_SECRET_KEYS}
        kubernetes.use_secret_as_env(task, cfg.cluster.storage_secret, keys)
        kubernetes.use_secret_as_env(
            task,
            cfg.cluster.storage_secret,
            {"AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"},
            optional=True,
        )
    return task


def _run_params(cfg, schedule_time, data_source, train_epochs, tune_max_trials, overrides):
    """The ``params`` task: the run's parameters merged, validated and split by step."""
    task = c.run_params(
        config_json=cfg.sections_json(*type(cfg).model_fields),
        overrides=overrides,
        data_source=data_source,
        train_epochs=train_epochs,
        tune_max_trials=tune_max_trials,
        schedule_time=schedule_time,
    )
    _step(cfg, task, "run-params")
    # Never from cache: "{date}" may need today's date; the steps' caching keys on its outputs.
    return task.set_caching_options(False)


def _params_and_preprocess(cfg, schedule_time, data_source, train_epochs, tune_max_trials,
                           overrides):  # fmt: skip
    """The first tasks of either pipeline: the run's parameters, then preprocess (the task
    returned has the ``dataset`` output)."""
    params = _run_params(cfg, schedule_time, data_source, train_epochs, tune_max_trials, overrides)
    return params, _preprocess(cfg, params)


def _preprocess(cfg: PipelineConfig, params):
    """One preprocess task, or with ``data.parallel_tasks`` N > 1: plan -> convert x N (a
    ParallelFor) -> merge. Every one of them gets preprocess's config sections and overrides."""
    sections, overrides = _sections(cfg, "preprocess"), params.outputs["preprocess"]
    num_tasks = cfg.data.parallel_tasks
    if num_tasks == 1:
        prep = c.preprocess(config_json=sections, overrides=overrides)
        return _step(cfg, _with_storage_secret(cfg, prep), "preprocess")
    plan = c.preprocess_plan(config_json=sections, overrides=overrides)
    _step(cfg, _with_storage_secret(cfg, plan), "preprocess-plan")
    at_once = min(cfg.data.max_parallel_tasks or num_tasks, num_tasks)
    with dsl.ParallelFor(items=list(range(num_tasks)), parallelism=at_once, name="ranges") as task:
        # The convert tasks read the plan's config: no other task's output goes into the loop
        # (kfp.local 2.17 hands a loop task the loop item for every upstream task's parameter).
        convert = c.preprocess_convert(task=task, plan=plan.outputs["plan"])
        _step(cfg, _with_storage_secret(cfg, _on_store(cfg, convert)), "preprocess-convert")
        if cfg.data.convert_retries:
            # A pod lost to its node or a store that hiccups: run the range again, not the run.
            convert.set_retry(
                num_retries=cfg.data.convert_retries, backoff_duration="10s", backoff_factor=2.0
            )
    merge = c.preprocess_merge(
        plan=plan.outputs["plan"], parts=dsl.Collected(convert.outputs["part"])
    )
    return _step(cfg, _with_storage_secret(cfg, _on_store(cfg, merge)), "preprocess-merge")


def _on_store(cfg: PipelineConfig, task):
    """Mount the cluster's claim into a task that writes shards to ``data.shard_store`` on it."""
    store = cfg.data.shard_store or ""
    mount = cfg.cluster.mount_path.rstrip("/") + "/"
    if store.startswith(mount) or store == mount.rstrip("/"):
        return _on_claim(cfg, task)
    return task


def _sections(cfg: PipelineConfig, step: str) -> str:
    """The config sections ``step`` receives (``STEP_SECTIONS``), as JSON."""
    return cfg.sections_json(*STEP_SECTIONS[step])


def _train_and_gate(cfg: PipelineConfig, dataset, min_accuracy, params):
    """tune -> train -> quantize -> evaluate -> [promote | reject]; returns (evaluate, gate)."""
    search = c.tune(
        config_json=_sections(cfg, "tune"), overrides=params.outputs["tune"], dataset=dataset
    )
    _step(cfg, _with_storage_secret(cfg, _on_claim(cfg, search)), "tune")
    fit = c.train(
        config_json=_sections(cfg, "train"),
        overrides=params.outputs["train"],
        dataset=dataset,
        best_params=search.outputs["best_params"],
    )
    _step(cfg, _with_storage_secret(cfg, _on_claim(cfg, fit)), "train")
    quant = c.quantize(
        config_json=_sections(cfg, "quantize"),
        overrides=params.outputs["quantize"],
        dataset=dataset,
        model=fit.outputs["model"],
    )
    _step(cfg, _with_storage_secret(cfg, quant), "quantize")
    ev = c.evaluate(
        config_json=_sections(cfg, "evaluate"),
        overrides=params.outputs["evaluate"],
        min_accuracy=min_accuracy,
        dataset=dataset,
        model=fit.outputs["model"],
        quantized=quant.outputs["quantized"],
        best_params=search.outputs["best_params"],
    )
    _step(cfg, _with_storage_secret(cfg, ev), "evaluate")
    gate = c.check_accuracy(evaluation=ev.outputs["evaluation"], min_accuracy=min_accuracy)
    _step(cfg, gate, "check-accuracy")
    _promote_or_reject(cfg, gate, params, fit, quant, ev, min_accuracy)
    if cfg.tracking.mlflow_uri:
        _track(cfg, gate, params, fit, quant, ev)
    return ev, gate


def _track(cfg: PipelineConfig, gate, params, fit, quant, ev) -> None:
    """The ``track`` task: the run, its artifacts and the gate's decision logged to MLflow."""
    logged = c.track(
        config_json=_sections(cfg, "track"),
        overrides=params.outputs["track"],
        run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
        promoted=gate.output,
        evaluation=ev.outputs["evaluation"],
        model=fit.outputs["model"],
        quantized=quant.outputs["quantized"],
    )
    # It writes to a server outside the pipeline: never from cache.
    _step(cfg, logged, "track").set_caching_options(False)


def _promote_or_reject(cfg: PipelineConfig, gate, params, fit, quant, ev, min_accuracy) -> None:
    """The gate's two branches: promote the fp32 and int8 models (and publish them to
    ``retrain.registry``), or record why not."""
    # Gate on the component's single return value: dsl.If on a *named* output of a
    # NamedTuple silently evaluates false under kfp.local.
    with dsl.If(gate.output == True, name="accuracy-ok"):  # noqa: E712 (a KFP expression)
        publish = c.promote(
            config_json=_sections(cfg, "promote"),
            overrides=params.outputs["promote"],
            model=fit.outputs["model"],
            quantized=quant.outputs["quantized"],
            evaluation=ev.outputs["evaluation"],
        )
        _step(cfg, publish, "promote")
        if cfg.retrain.registry:
            _on_claim(cfg, publish).set_caching_options(False)  # the registry lives outside
    with dsl.Else(name="accuracy-low"):
        rejected = c.reject(evaluation=ev.outputs["evaluation"], min_accuracy=min_accuracy)
        _step(cfg, rejected, "reject")


def build_pipeline(cfg: PipelineConfig, schedule_time: str = ""):
    """Return the ``@dsl.pipeline`` function for ``cfg`` (compile it or run it under kfp.local).

    ``schedule_time`` is what the ``params`` task gets as the time a run is for (``{date}`` in
    ``data.source``): ``kubetrain.pipeline.params.SCHEDULE_PLACEHOLDER`` when compiling for a KFP backend,
    which resolves it (the exact placeholder as the whole value); empty under kfp.local, whose
    2.17 runner fails a task given that placeholder -- the task then takes the current time.

    Its outputs: ``evaluation`` and ``promoted``; with ``retrain.only_if_changed`` only
    ``retrained`` (whether the inputs changed and the rest of the pipeline ran).
    """

    if cfg.retrain.only_if_changed:
        cfg_check = _sections(cfg, "check_changed")

        @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
        def retrain_pipeline(
            min_accuracy: float = steps.promotion_bar(cfg),
            data_source: str = "",
            train_epochs: int = 0,
            tune_max_trials: int = 0,
            overrides: dict = {},  # noqa: B006 (KFP reads the default; it is never mutated)
        ) -> bool:
            params, prep = _params_and_preprocess(
                cfg, schedule_time, data_source, train_epochs, tune_max_trials, overrides
            )
            changed = c.check_changed(
                config_json=cfg_check,
                overrides=params.outputs["check_changed"],
                dataset=prep.outputs["dataset"],
            )
            # The answer depends on the registry, not only on the inputs: never cache it.
            _step(cfg, _on_claim(cfg, changed), "check-changed").set_caching_options(False)
            with dsl.If(changed.output == True, name="inputs-changed"):  # noqa: E712
                _train_and_gate(cfg, prep.outputs["dataset"], min_accuracy, params)
            return changed.output

        return retrain_pipeline

    class Outputs(NamedTuple):
        evaluation: dsl.Artifact
        promoted: bool

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def kubetrain_pipeline(
        min_accuracy: float = steps.promotion_bar(cfg),
        data_source: str = "",
        train_epochs: int = 0,
        tune_max_trials: int = 0,
        overrides: dict = {},  # noqa: B006 (KFP reads the default; it is never mutated)
    ) -> Outputs:
        params, prep = _params_and_preprocess(
            cfg, schedule_time, data_source, train_epochs, tune_max_trials, overrides
        )
        ev, gate = _train_and_gate(cfg, prep.outputs["dataset"], min_accuracy, params)
        return Outputs(evaluation=ev.outputs["evaluation"], promoted=gate.output)

    return kubetrain_pipeline
