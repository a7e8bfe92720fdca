"""Preprocess fanned out (plan -> convert x N -> merge): the ranges, the same dataset byte for
byte for every N (text and tables here; images in test_vision_fanout.py), merge refusing an
incomplete set in one line naming the range, the tokenizer's sample, and what the pipeline and
its config make of data.parallel_tasks."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("tokenizers")

from kubetrain.core.artifacts import PREPROCESS_PART, PartArtifact, PlanArtifact
from kubetrain.core.errors import ConfigError, DataError
from kubetrain.core.records import PixelSums, PreprocessPlan, ShardSlot
from kubetrain.data.config import DataConfig, TokenizerConfig
from kubetrain.data.fanout import assign_ranges, ordered_results, range_label
from kubetrain.data.text import iter_examples, plan_text
from kubetrain.data.tokenize import train_tokenizer
from kubetrain.launch.config import StepsConfig
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import build_dataset, convert_range, merge_dataset, plan_dataset

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "hex",
    "jovial",
    "boxers",
]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def text_source(tmp_path_factory) -> Path:
    """A sorted CSV (by label, as real corpora often are) of 600 rows, with empty rows."""
    path = tmp_path_factory.mktemp("text") / "reviews.csv"
    texts = sentences(600)
    labels = sorted(["good", "bad", "meh"] * 200)
    texts[17] = "   "  # skipped and counted
    pd.DataFrame({"text": texts, "label": labels, "target": sentences(600, 1)}).to_csv(
        path, index=False
    )
    return path


def text_cfg(source: Path, task: str = "text_classification", **kw) -> DataConfig:
    return DataConfig(
        source=str(source), task=task, max_length=16, shard_samples=kw.pop("shard_samples", 24),
        tokenizer=kw.pop("tokenizer", {"vocab_size": 64}), **kw,
    )  # fmt: skip


def fan_out(cfg: DataConfig, tmp: Path, num_tasks: int) -> tuple[PreprocessPlan, Path]:
    """plan -> convert x N -> merge, each as its own call on directories (as the KFP tasks)."""
    plan = plan_dataset(cfg, tmp / "plan", num_tasks)
    parts = [tmp / f"part-{k}" for k in range(num_tasks)]
    for k, part in enumerate(parts):
        convert_range(tmp / "plan", k, part)
    merge_dataset(tmp / "plan", parts, tmp / "dataset")
    return plan, tmp / "dataset"


def digests(directory: Path) -> dict[str, str]:
    """Every file of a dataset but those that record how it was made (the config, the time
    taken, the processes): meta.json and text.json (compared field by field instead)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name not in ("meta.json", "text.json")
    }


def text_content(directory: Path) -> dict:
    meta = json.loads((directory / "text.json").read_text())
    return {k: v for k, v in meta.items() if k not in ("tokenize_seconds", "tokenize_processes")}


@pytest.mark.parametrize(
    ("samples", "tasks", "ranges"),
    [
        ([10, 10, 10, 10], 2, [(0, 2), (2, 4)]),
        ([10, 10, 10, 10], 1, [(0, 4)]),
        ([2, 2, 2, 2, 2, 1], 3, [(0, 2), (2, 4), (4, 6)]),
        ([100, 1, 1, 1], 2, [(0, 1), (1, 4)]),
        ([5, 5], 3, [(0, 1), (1, 1), (1, 2)]),  # more tasks than shards: one gets none
        ([], 2, [(0, 0), (0, 0)]),
    ],
    ids=["even", "one-task", "uneven-tail", "one-big-shard", "more-tasks-than-shards", "empty"],
)
def test_ranges_are_contiguous_cover_every_shard_once_and_balance_samples(samples, tasks, ranges):
    got = assign_ranges(samples, tasks)
    assert got == ranges
    assert [i for a, b in got for i in range(a, b)] == list(range(len(samples)))


@pytest.mark.parametrize("task", ["text_classification", "seq2seq"])
def test_text_is_the_same_dataset_byte_for_byte_for_one_two_and_three_tasks(
    text_source, tmp_path, task
):
    cfg = text_cfg(text_source, task, num_workers=0)
    one = build_dataset(cfg, tmp_path / "one")
    for n in (1, 2, 3):
        plan, dataset = fan_out(cfg, tmp_path / f"n{n}", n)
        got = build_meta(dataset)
        assert got.version == one.version, n
        assert digests(dataset) == digests(tmp_path / "one"), n
        assert text_content(dataset) == text_content(tmp_path / "one")
        assert (got.sizes, got.tokens, got.truncated) == (one.sizes, one.tokens, one.truncated)
        assert got.preprocess_tasks == n
    assert len(plan.slots) > 3  # the three tasks had shards of their own
    assert all(b > a for a, b in plan.ranges)


def build_meta(dataset: Path):
    from kubetrain.core.artifacts import DatasetArtifact

    return DatasetArtifact.read_meta(dataset)


def test_tables_are_built_whole_by_merge_and_the_convert_tasks_have_nothing_to_do(tmp_path):
    cfg = DataConfig()  # the bundled digits
    plan, dataset = fan_out(cfg, tmp_path, 2)
    assert plan.whole and plan.slots == []
    assert all(PartArtifact.load(tmp_path / f"part-{k}").part.slots == [] for k in range(2))
    assert build_meta(dataset).version == build_dataset(cfg, tmp_path / "one").version


def test_merge_refuses_an_incomplete_set_naming_the_missing_range(text_source, tmp_path):
    cfg = text_cfg(text_source)
    plan = plan_dataset(cfg, tmp_path / "plan", 3)
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    for k in (0, 2):  # convert task 2 never finished
        convert_range(tmp_path / "plan", k, parts[k])
    first, end = plan.ranges[1]
    names = f"{plan.slots[first].name[:-8]}..{plan.slots[end - 1].name[:-8]}"
    samples = sum(s.samples for s in plan.slots[first:end])
    with pytest.raises(DataError) as err:
        merge_dataset(tmp_path / "plan", parts, tmp_path / "dataset")
    assert str(err.value) == (
        f"data error: preprocess merge: range 2/3 ({names}, {samples} samples) is missing (no "
        "complete part from convert task 2); re-run the pipeline (finished ranges come from "
        "the cache)"
    )
    assert "\n" not in str(err.value)
    assert list((tmp_path / "dataset").iterdir()) == []  # nothing half-written
    # A part that lost one of its shards' records is incomplete too.
    convert_range(tmp_path / "plan", 1, parts[1])
    part = PartArtifact.load(parts[1])
    part.part.slots.pop()
    part.save()
    with pytest.raises(DataError, match=r"range 2/3 .* is missing \(its part lacks train-\d+"):
        merge_dataset(tmp_path / "plan", parts, tmp_path / "dataset")


def test_merge_refuses_a_part_of_another_plan_and_a_shard_that_is_not_there(text_source, tmp_path):
    cfg = text_cfg(text_source)
    fan_out(cfg, tmp_path / "a", 2)
    fan_out(cfg.model_copy(update={"seed": 1}), tmp_path / "b", 2)
    parts = [tmp_path / "a" / "part-0", tmp_path / "b" / "part-1"]
    with pytest.raises(DataError, match=r"the part of convert task 2 was made from another plan"):
        merge_dataset(tmp_path / "a" / "plan", parts, tmp_path / "mixed")
    shard = next((tmp_path / "a" / "part-1").glob("*.parquet"))
    shard.unlink()
    with pytest.raises(DataError, match=rf"shard .*{shard.name}: missing"):
        merge_dataset(
            tmp_path / "a" / "plan", [tmp_path / "a" / f"part-{k}" for k in range(2)],
            tmp_path / "gone",
        )  # fmt: skip


def test_a_shard_store_takes_every_task_s_shards_and_the_dataset_points_at_it(
    text_source, tmp_path
):
    from kubetrain.core.artifacts import DatasetArtifact
    from kubetrain.tasks import open_task
    from kubetrain.tasks.config import TaskConfig

    cfg = text_cfg(text_source, shard_store=str(tmp_path / "store"))
    plan, dataset = fan_out(cfg, tmp_path / "run", 3)
    root = tmp_path / "store" / f"text_classification-{plan.fingerprint}"
    one = build_dataset(text_cfg(text_source), tmp_path / "one")
    assert digests(root) == digests(tmp_path / "one")  # the shards, manifest and tokenizer
    assert sorted(p.name for p in dataset.iterdir()) == ["meta.json"]  # nothing gathered
    assert not list((tmp_path / "run" / "part-0").glob("*.parquet"))
    data = DatasetArtifact.load(dataset)
    assert data.meta.root == str(root) and data.version == one.version
    task = open_task(TaskConfig.model_validate({"data": cfg.model_dump()}), data)
    assert sum(1 for _ in task.records("train")) == one.sizes["train"]


def test_a_convert_task_refuses_a_source_that_changed_since_the_plan(text_source, tmp_path):
    source = tmp_path / "moving.csv"
    shutil.copy(text_source, source)
    cfg = text_cfg(source)
    plan_dataset(cfg, tmp_path / "plan", 2)
    table = pd.read_csv(source)
    pd.concat([table.iloc[:5], table]).to_csv(source, index=False)  # rows shifted
    with pytest.raises(
        DataError,
        match=r"moving.csv: shard \S+ has \d+ samples up to row \d+, "
        r"the plan \d+ up to row \d+ \(the source changed since it was planned\)",
    ):
        convert_range(tmp_path / "plan", 0, tmp_path / "part-0")
    assert not PartArtifact.is_complete(tmp_path / "part-0")
    assert not list((tmp_path / "part-0").iterdir())  # the shards it had written are gone


def test_a_convert_task_that_is_not_one_of_the_plans_is_one_line(text_source, tmp_path):
    plan_dataset(text_cfg(text_source), tmp_path / "plan", 2)
    with pytest.raises(DataError, match=r"convert task 2 of a plan of 2 tasks \(0..1\)"):
        convert_range(tmp_path / "plan", 2, tmp_path / "part")


def test_the_tokenizer_trains_on_every_training_row_in_order_up_to_the_sample_size(
    text_source, tmp_path
):
    cfg = text_cfg(text_source)
    train_texts = [ex.text for ex in iter_examples(cfg) if ex.split == "train"]
    whole = train_tokenizer(iter(train_texts), cfg.tokenizer).to_str()
    assert plan_text(cfg, 2).tokenizer.to_str() == whole  # the split has fewer rows than 1000
    # A larger split: a seeded sample of sample_size rows, the same for every number of tasks.
    big = tmp_path / "big.csv"
    pd.DataFrame({"text": sentences(3000, 2), "label": ["a", "b", "c"] * 1000}).to_csv(
        big, index=False
    )
    small = text_cfg(big, tokenizer={"vocab_size": 64, "sample_size": 1000})
    one, three = plan_text(small, 1), plan_text(small, 3)
    assert one.tokenizer.to_str() == three.tokenizer.to_str()
    assert one.record.fingerprint == three.record.fingerprint
    everything = [ex.text for ex in iter_examples(small) if ex.split == "train"]
    assert len(everything) > 1000
    assert one.tokenizer.to_str() != train_tokenizer(iter(everything), small.tokenizer).to_str()
    other_seed = plan_text(small.model_copy(update={"seed": 3}), 1)
    assert other_seed.tokenizer.to_str() != one.tokenizer.to_str()


def test_the_tokenizer_sample_size_is_a_config_field_with_a_floor():
    assert TokenizerConfig().sample_size == 500_000
    with pytest.raises(ConfigError, match=r"data.tokenizer.sample_size"):
        load_config(None, ["data.tokenizer.sample_size=10"])


def test_pixel_sums_add_in_float64_and_count_pixels_and_images():
    a = PixelSums(sum=[0.1, 0.2], squares=[0.01, 0.04], pixels=4, images=1)
    b = PixelSums(sum=[0.3, 0.4], squares=[0.09, 0.16], pixels=4, images=1)
    total = a.plus(b)
    assert total.sum == [0.1 + 0.3, 0.2 + 0.4] and total.squares == [0.01 + 0.09, 0.04 + 0.16]
    assert (total.pixels, total.images) == (8, 2)


def test_ordered_results_and_labels_name_shards_by_split_and_number():
    slots = [ShardSlot(split="train", index=i, samples=10) for i in range(3)]
    slots.append(ShardSlot(split="val", index=0, samples=4))
    plan = PreprocessPlan(
        kind="images", source="s", fingerprint="f", num_tasks=2, slots=slots,
        ranges=assign_ranges([s.samples for s in slots], 2),
    )  # fmt: skip
    assert range_label(plan, 0) == "range 1/2 (train-000000..train-000001, 20 samples)"
    assert range_label(plan, 1) == "range 2/2 (train-000002..val-000000, 14 samples)"
    with pytest.raises(DataError, match=r"range 1/2 .* is missing \(no complete part"):
        ordered_results(plan, [None, None])


def test_plan_and_part_artifacts_are_complete_only_with_their_records(text_source, tmp_path):
    assert not PlanArtifact.is_complete(tmp_path)
    with pytest.raises(DataError, match=r"no preprocess plan \(plan.json\)"):
        PlanArtifact.load(tmp_path)
    plan_dataset(text_cfg(text_source), tmp_path / "plan", 1)
    convert_range(tmp_path / "plan", 0, tmp_path / "part")
    assert (tmp_path / "part" / PREPROCESS_PART).is_file()
    (tmp_path / "part" / PREPROCESS_PART).write_text('{"kind": "seq2seq"}')
    with pytest.raises(DataError, match=r"part.json: not a DatasetPart"):
        PartArtifact.load(tmp_path / "part")


@pytest.mark.parametrize(
    ("settings", "convert"),
    [
        ([], ("1", "2", "2Gi")),
        (["cluster.steps.preprocess.cpu=4", "cluster.steps.preprocess.memory=8Gi"],
         ("4", "4", "8Gi")),
        (["cluster.steps.preprocess.cpu=4", "cluster.steps.preprocess_convert.memory=16Gi"],
         ("4", "4", "16Gi")),
        (["cluster.steps.preprocess_convert.cpu=8", "cluster.steps.preprocess.cpu_limit=12"],
         ("8", "8", "2Gi")),
    ],
    ids=["default", "preprocess-entry", "own-over-preprocess", "own-cpu-is-its-limit"],
)  # fmt: skip
def test_the_fanned_out_tasks_take_preprocess_entry_then_their_own(settings, convert):
    steps: StepsConfig = load_config(None, settings).cluster.steps
    pod = steps.for_step("preprocess-convert")
    assert (pod.cpu, pod.cpu_limit or pod.cpu, pod.memory) == convert
    assert steps.for_step("preprocess-merge").memory == steps.for_step("preprocess").memory


def test_how_preprocess_is_spread_does_not_change_the_model_fingerprint():
    one = load_config(None, [])
    many = load_config(None, ["data.parallel_tasks=4", "data.max_parallel_tasks=2",
                              "data.convert_retries=5", "data.shard_store=/mnt/x"])  # fmt: skip
    assert one.model_inputs_json() == many.model_inputs_json()
    assert one.model_inputs_json() != load_config(None, ["data.seed=3"]).model_inputs_json()


@pytest.mark.parametrize(
    "key", ["data.parallel_tasks", "data.max_parallel_tasks", "data.convert_retries",
            "data.shard_store"],
)  # fmt: skip
def test_the_fan_out_is_fixed_when_the_pipeline_is_compiled(key):
    from kubetrain.pipeline.params import is_compile_time

    assert is_compile_time(key)
