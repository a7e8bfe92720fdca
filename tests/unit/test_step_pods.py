"""The pipeline's own step pods as the compiled IR carries them: CPU/memory requests and limits
for every task, GPUs, node selector and tolerations (kfp-kubernetes) where ``cluster.steps``
asks, and ``cluster.image`` as every step's image."""

from __future__ import annotations

import pytest
import yaml
from kubetrain.pipelines.training import DISPLAY_NAMES

from kubetrain.core.errors import ConfigError
from kubetrain.launch.config import StepsConfig
from kubetrain.pipeline.config import load_config
from kubetrain.pipeline.submit import compile_pipeline

GPU_PLACEMENT = [
    "cluster.node_selector={nvidia.com/gpu.present: 'true'}",
    "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
]


def compiled(tmp_path, *settings: str) -> tuple[dict, dict]:
    """(the pipeline spec, its kubernetes platform spec) of the config ``settings`` make."""
    out = tmp_path / "pipeline.yaml"
    compile_pipeline(load_config(None, list(settings)), out)
    spec, *platform = yaml.safe_load_all(out.read_text())
    if not platform:  # no task has a kfp-kubernetes setting
        return spec, {}
    return spec, platform[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def resources(spec: dict, task: str) -> dict:
    return spec["deploymentSpec"]["executors"][f"exec-{task}"]["container"]["resources"]


def test_every_step_has_requests_and_limits_and_the_cluster_image(tmp_path):
    spec, _ = compiled(tmp_path, "cluster.image=registry.example/kubetrain-trainer:1",
                       "tracking.mlflow_uri=http://127.0.0.1:5000")  # fmt: skip
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) >= 9
    for name, executor in executors.items():
        container = executor["container"]
        assert container["image"] == "registry.example/kubetrain-trainer:1", name
        r = container["resources"]
        assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == ("1", "2"), name
        assert r["resourceMemoryRequest"] == r["resourceMemoryLimit"] == "2Gi", name
        assert "accelerator" not in r, name


# settings -> step -> (cpu request, cpu limit, memory, GPUs, node selector, tolerated taint key)
CASES = {
    "default-changed": (
        ["cluster.steps.default.cpu=500m", "cluster.steps.default.memory=1Gi"],
        {"quantize": ("500m", "2", "1Gi", None, None, None)},
    ),
    "own-cpu-is-its-limit": (
        ["cluster.steps.evaluate.cpu=8", "cluster.steps.evaluate.memory=32Gi"],
        {"evaluate": ("8", "8", "32Gi", None, None, None),
         "preprocess": ("1", "2", "2Gi", None, None, None)},
    ),
    "gpu-step-goes-where-the-jobs-go": (
        ["cluster.steps.evaluate.gpus=1", *GPU_PLACEMENT],
        {"evaluate": ("1", "2", "2Gi", "1", {"nvidia.com/gpu.present": "true"},
                      "nvidia.com/gpu"),
         "train": ("1", "2", "2Gi", None, None, None)},
    ),
    "own-placement": (
        ["cluster.steps.preprocess.node_selector={pool: cpu-big}",
         "cluster.steps.preprocess.tolerations=[{key: big, operator: Exists}]"],
        {"preprocess": ("1", "2", "2Gi", None, {"pool": "cpu-big"}, "big")},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_compiled_ir_carries_each_steps_pod(tmp_path, case):
    settings, expected = CASES[case]
    spec, platform = compiled(tmp_path, *settings)
    for task, (cpu, cpu_limit, memory, gpus, selector, taint) in expected.items():
        r = resources(spec, task)
        assert (r["resourceCpuRequest"], r["resourceCpuLimit"]) == (cpu, cpu_limit)
        assert r["resourceMemoryRequest"] == r["resourceMemoryLimit"] == memory
        accelerator = r.get("accelerator")
        assert (accelerator and accelerator["resourceCount"]) == gpus
        if gpus:
            assert accelerator["resourceType"] == "nvidia.com/gpu"
        pod = platform.get(f"exec-{task}", {})
        assert (pod.get("nodeSelector") or {}).get("labels") == selector
        assert [t["key"] for t in pod.get("tolerations") or []] == ([taint] if taint else [])


def test_the_table_names_every_step_of_the_pipeline():
    steps = set(StepsConfig.model_fields) - {"default"}
    assert steps == {name.replace("-", "_") for name in DISPLAY_NAMES}


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("cluster.steps.evalute.cpu=2", r"cluster.steps.evalute: no such field"),
        ("cluster.steps.train.cpu=lots", r"cluster.steps.train.cpu: String should match"),
        ("cluster.steps.train.gpus=-1", r"cluster.steps.train.gpus: Input should be greater"),
    ],
    ids=["misspelt-step", "bad-quantity", "negative-gpus"],
)
def test_a_bad_step_setting_is_one_line(setting, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, [setting])
    assert "\n" not in str(err.value)


def test_a_cpu_limit_below_the_request_is_one_line():
    with pytest.raises(ConfigError, match=r"cluster.steps.train: cpu_limit \(1\) is below cpu"):
        load_config(None, ["cluster.steps.train.cpu=4", "cluster.steps.train.cpu_limit=1"])
