"""Preprocess fanned out under kfp.local, with the pipeline's own wiring (run-params, then plan ->
a ParallelFor of convert tasks -> merge over their Collected parts): the dataset is the one-task
preprocess's, byte for byte; a re-run with unchanged input takes every range from kfp.local's
cache; and ``kubetrain run`` shows the fan-out and ends with a dataset of the same version."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")

from fanout_pipeline import run_preprocess
from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.pipeline.config import PipelineConfig, load_config
from kubetrain.tasks import build_dataset
from tests.conftest import run_cli

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def write_texts(path: Path, n: int = 500) -> Path:
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 8))]
            label = "long" if len(words) > 5 else "short"
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def text_config(source: Path, *overrides: str) -> PipelineConfig:
    return load_config(None, [
        f"data.source={source}", "data.task=text_classification", "data.max_length=16",
        "data.tokenizer.vocab_size=48", "data.tokenizer.min_frequency=1",
        "data.shard_samples=32", *overrides,
    ])  # fmt: skip


def shard_digests(dataset: Path) -> dict[str, str]:
    names = [*sorted(p.name for p in dataset.glob("*.parquet")), "shards.json", "tokenizer.json"]
    return {n: hashlib.sha256((dataset / n).read_bytes()).hexdigest() for n in names}


def test_the_fan_out_under_kfp_local_is_the_one_task_dataset_and_reruns_from_cache(
    tmp_path,
):
    source = write_texts(tmp_path / "texts.jsonl")
    one = build_dataset(text_config(source).data, tmp_path / "one")
    cfg = text_config(source, "data.parallel_tasks=3", "data.max_parallel_tasks=2")
    dataset = run_preprocess(cfg, tmp_path)
    meta = DatasetArtifact.read_meta(dataset)
    assert meta.version == one.version
    assert meta.preprocess_tasks == 3 and meta.sizes == one.sizes
    assert shard_digests(dataset) == shard_digests(tmp_path / "one")
    parts = sorted(dataset.parent.parent.glob("*/preprocess-convert/part/part.json"))
    assert [json.loads(p.read_text())["task"] for p in parts] == [0, 1, 2]
    assert all(json.loads(p.read_text())["slots"] for p in parts)  # three real ranges

    # Unchanged input, same directory: plan, every range and merge come from the cache (kfp.local
    # hands back the first run's outputs and no preprocess task writes anything; run-params runs).
    def written():
        runs = tmp_path / "kfp"  # <run>/[<loop iteration>/]<task>/<output>/...
        tasks = (p for p in runs.rglob("*") if p.is_file())
        return sorted(p for p in tasks if "run-params" not in p.relative_to(runs).parts)

    before = written()
    again = run_preprocess(cfg, tmp_path)
    assert again == dataset and written() == before
    assert DatasetArtifact.read_meta(again).version == one.version


@pytest.mark.slow
def test_kubetrain_run_shows_the_fan_out_and_trains_on_the_same_dataset(tmp_path):
    source = write_texts(tmp_path / "texts.jsonl", n=300)
    with source.open("a") as f:  # one row with no text: skipped, and said at the end
        f.write(json.dumps({"text": " ", "label": "short"}) + "\n")
    overrides = [
        f"data.source={source}", "data.task=text_classification", "data.max_length=16",
        "data.tokenizer.vocab_size=48", "data.tokenizer.min_frequency=1",
        "data.shard_samples=32", "data.parallel_tasks=3", "model.name=transformer",
        "model.d_model=16", "model.heads=2", "model.layers=1", "model.ff=32", "train.nproc=1",
        "train.epochs=1", "train.batch_size=32", "tune.enabled=false",
        "quantize.method=dynamic_int8", "quantize.max_accuracy_drop=1",
        "evaluate.min_accuracy=0", "evaluate.latency_repeats=3",
    ]  # fmt: skip
    args = [a for o in overrides for a in ("--set", o)]
    proc = run_cli("run", "--output", str(tmp_path / "run"), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.split()[:2] == ["preprocess-convert", "done"] and line.endswith("3/3 done")
               for line in lines)  # fmt: skip
    merged = [line for line in lines if line.split()[:2] == ["preprocess-merge", "done"]]
    one = build_dataset(load_config(None, overrides[:6]).data, tmp_path / "one")
    assert len(merged) == 1 and f"dataset {one.version}" in merged[0]
    model = json.loads(next((tmp_path / "run").glob("kfp/*/train/model/model.json")).read_text())
    assert model["dataset_version"] == one.version
    assert f"data:               {source}: skipped 1 of 301 rows with empty text" in lines, (
        proc.stdout[-2500:]
    )


def test_convert_tasks_write_to_an_s3_shard_store_and_training_streams_from_it(tmp_path):
    """Each convert task (its own call, as its own pod) reads the source from S3 and writes its
    shards to the store; merge writes the manifest there; the dataset artifact points at it."""
    import s3fs

    from kubetrain.data.shards import read_manifest
    from kubetrain.tasks import convert_range, merge_dataset, plan_dataset
    from servers import s3_server

    source = write_texts(tmp_path / "texts.jsonl")
    one = build_dataset(text_config(source).data, tmp_path / "one")
    with s3_server() as s3:
        s3.make_bucket("data")
        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.put(str(source), "data/in/texts.jsonl")
        options = json.dumps(s3.storage_options)
        cfg = text_config(
            source, "data.source=s3://data/in/texts.jsonl", f"data.storage_options={options}",
            "data.shard_store=s3://data/datasets", "data.parallel_tasks=2",
        ).data  # fmt: skip
        plan = plan_dataset(cfg, tmp_path / "plan", 2)
        parts = [tmp_path / f"part-{k}" for k in range(2)]
        for k, part in enumerate(parts):
            convert_range(tmp_path / "plan", k, part)
            assert not list(part.glob("*.parquet"))
        meta = merge_dataset(tmp_path / "plan", parts, tmp_path / "dataset")
        root = f"s3://data/datasets/text_classification-{plan.fingerprint}"
        assert meta.root == root and meta.version == one.version
        stored = read_manifest(root, s3.storage_options)
        assert stored.to_json() == read_manifest(str(tmp_path / "one")).to_json()
        for shard in (s for v in stored.splits.values() for s in v):
            assert (
                fs.cat(f"{root[5:]}/{shard.path}") == (tmp_path / "one" / shard.path).read_bytes()
            )
