"""The text tasks (kubetrain.tasks.text) without processes: the preprocess into a
pipeline's empty output directory, length-bucketed training batches (equal steps on every rank,
exact mid-epoch resume, batch_size and batch_tokens), the model built from the config and rebuilt
from its spec, validation, examples, scores; the schedules and the model config fields."""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("tokenizers")

import itertools

from kubetrain.core.artifacts import DatasetArtifact
from kubetrain.core.distributed import DistContext
from kubetrain.core.errors import ConfigError, DataError
from kubetrain.models.networks import build_from_spec
from kubetrain.pipeline.config import load_config
from kubetrain.tasks import build_dataset, open_task

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "omicron",
]


def write_pairs(path, n: int = 240, seed: int = 0) -> str:
    """Generated text: words -> reversed words (seq2seq) and short/long (classification)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(2, 9))]
            text = " ".join(words)
            row = {"text": text, "target": " ".join(reversed(words)),
                   "label": "long" if len(words) > 5 else "short"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
    return str(path)


def config(source: str, task: str, *overrides: str):
    model = "transformer" if task == "text_classification" else "seq2seq_transformer"
    return load_config(
        overrides=[
            f"data.source={source}", f"data.task={task}", "data.max_length=16",
            "data.tokenizer.vocab_size=64", "data.tokenizer.min_frequency=1",
            f"model.name={model}", "model.d_model=16", "model.heads=2", "model.layers=1",
            "model.ff=32", "train.batch_size=8", "train.nproc=1", "train.epochs=1",
            "tune.enabled=false", *overrides,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module", params=["text_classification", "seq2seq"])
def dataset(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = config(write_pairs(tmp / "pairs.jsonl"), request.param)
    out = tmp / "ds"
    out.mkdir()  # a pipeline's output artifact: exists and is empty
    build_dataset(cfg.data, out)
    return cfg, DatasetArtifact.load(out)


def test_preprocess_writes_meta_json_last_into_an_empty_output_dir(dataset):
    cfg, data = dataset
    meta = data.meta
    assert data.kind == cfg.data.task and meta.format_version == 1
    assert meta.input_shape == [16] and sum(meta.sizes.values()) == 240
    assert (meta.classes == ["long", "short"]) == (cfg.data.task == "text_classification")
    assert meta.vocab_size == 64 and meta.special_ids["pad"] == 0
    assert DatasetArtifact.is_complete(data.path)
    assert not list(data.path.parent.glob(".ds.*"))  # no temporary directory beside it


def test_bad_source_leaves_the_empty_output_dir_empty(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok", "label": "a"}\n{"text": "\xff\xfe", "label": "b"}\n')
    out = tmp_path / "ds"
    out.mkdir()
    with pytest.raises(DataError, match=r"bad.jsonl:2: bytes that are not UTF-8"):
        build_dataset(config(str(bad), "text_classification").data, out)
    assert list(out.iterdir()) == []


def collect(batches, epoch: int, start_step: int = 0) -> list[torch.Tensor]:
    batches.set_epoch(epoch, start_step)
    return [torch.cat([t.flatten() for t in (*inputs, target)]) for inputs, target in batches]


@pytest.mark.parametrize("budget", [None, 96], ids=["batch_size", "batch_tokens"])
def test_ranks_take_the_agreed_steps_and_resume_continues_exactly(dataset, budget, monkeypatch):
    from kubetrain.tasks import text

    cfg, data = dataset
    tc = cfg.train.model_copy(update={"nproc": 2, "batch_tokens": budget})
    # Two ranks in one process, no process group: under a token budget the ranks' MIN is
    # stood in for by "one less than mine", so a rank must stop short of its own count.
    monkeypatch.setattr(text, "_agree_min", lambda count, ctx: max(1, count - 1))
    ranks = [open_task(cfg, data).train_batches(tc, DistContext(r, 2)) for r in (0, 1)]
    if budget is None:
        assert ranks[0].steps == ranks[1].steps  # from the sizes, no collective
    for batches in ranks:
        full = collect(batches, epoch=1)
        assert len(full) == batches.steps  # grad_accum_steps is 1
        if budget is not None:
            assert batches.steps == sum(batches._counts) - 1
        resumed = collect(batches, epoch=1, start_step=3)
        assert [t.tolist() for t in resumed] == [t.tolist() for t in full[3:]]
    task = open_task(cfg, data)
    batches = task.train_batches(cfg.train, DistContext())
    collect(batches, 0)
    assert 0 < task.train_summary(DistContext())["padding_share"] < 0.5


def test_model_trains_validates_scores_and_rebuilds_from_its_spec(dataset):
    cfg, data = dataset
    task = open_task(cfg, data)
    torch.manual_seed(0)
    model = task.build_model(cfg.model)
    batches = task.train_batches(cfg.train, DistContext())
    batches.set_epoch(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for inputs, target in batches:
        loss = task.loss(model(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    val_loss, val_acc = task.validate(model, DistContext())
    assert val_loss > 0 and 0 <= val_acc <= 1
    rebuilt = build_from_spec(task.model_spec(cfg.model))
    rebuilt.load_state_dict(model.state_dict())
    x, y = task.examples("test", 5, seed=1)
    assert x.shape == (5, 16) and x.dtype == torch.long
    model.eval(), rebuilt.eval()
    inputs = (x,) if data.kind == "text_classification" else (x, y[:, :-1])
    assert torch.equal(model(*inputs), rebuilt(*inputs))
    scores = task.score(rebuilt, "test")
    assert scores.samples == data.meta.num_samples("test") and scores.examples
    if data.kind == "text_classification":
        assert scores.metric == "accuracy" and 0 <= scores.values["macro_f1"] <= 1
        assert set(scores.examples[0]) == {"text", "true", "predicted"}
        assert len(scores.values["confusion_matrix"]) == 2
    else:
        assert scores.metric == "bleu" and "accuracy" not in scores.values
        for key in ("bleu", "rouge_l", "copy_baseline_bleu", "copy_baseline_rouge_l"):
            assert 0 <= scores.values[key] <= 1
        assert scores.values["copy_baseline_rouge_l"] > 0  # the same words, reversed
        assert set(scores.examples[0]) == {"source", "reference", "prediction"}


def test_examples_are_a_seeded_draw_streamed_from_the_split(dataset):
    """``examples`` keeps only the drawn records while the split streams by: the draw of the
    whole split in stream order, the same for a seed, all of a smaller split."""
    import numpy as np

    cfg, data = dataset
    task = open_task(cfg, data)
    every = list(task.records("train"))
    assert len(every) == data.meta.num_samples("train")
    drawn = np.sort(np.random.default_rng(3).permutation(len(every))[:7])
    first = "input_ids" if data.kind == "text_classification" else "src_ids"
    x, _ = task.examples("train", 7, seed=3)
    expected = task._full([every[i][first] for i in drawn])
    assert torch.equal(x, expected)
    assert not torch.equal(x, task.examples("train", 7, seed=4)[0])
    assert len(task.examples("val", 10_000)[0]) == data.meta.num_samples("val")


def test_beam_search_setting_reaches_the_score(dataset):
    cfg, data = dataset
    if data.kind != "seq2seq":
        pytest.skip("decoding is seq2seq's")
    cfg = cfg.model_copy(
        update={
            "evaluate": cfg.evaluate.model_copy(update={"beam_size": 3, "max_decode_length": 5})
        }
    )
    task = open_task(cfg, data)
    torch.manual_seed(0)
    model = task.build_model(cfg.model).eval()
    scores = task.score(model, "val")
    assert all(len(e["prediction"].split()) <= 5 for e in scores.examples)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["data.task=seq2seq", "model.name=mlp"], "'mlp' does not take data.task 'seq2seq'"),
        (["data.task=text_classification", "model.name=seq2seq_transformer"],
         "does not take data.task 'text_classification'"),
        (["model.name=transformer"], "'transformer' is a text model"),
        (["data.task=seq2seq", "model.name=seq2seq_transformer", "data.max_length=64",
          "model.max_len=32"], "model.max_len 32 is below data.max_length 64"),
    ],
    ids=["mlp-on-text", "classifier-on-seq2seq", "text-model-on-features", "max-len"],
)  # fmt: skip
def test_a_model_that_cannot_take_the_task_is_refused_before_any_step(overrides, match):
    from kubetrain.pipeline.steps import check_supported

    with pytest.raises(ConfigError, match=match):
        check_supported(load_config(overrides=overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["model.d_model=30", "model.heads=4"], "divisible by heads"),
        (["model.name=transformers"], "is not 'mlp'"),
        (["train.warmup_steps=5", "train.warmup_epochs=1"], "not both"),
        (["train.label_smoothing=1.0"], "less than 1"),
    ],
    ids=["heads", "unknown-name", "two-warmups", "smoothing"],
)
def test_text_model_and_schedule_fields_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=overrides)


def test_inverse_sqrt_schedule_warms_up_then_decays():
    from kubetrain.train.optim import lr_factor

    tc = load_config(overrides=["train.lr_schedule=inverse_sqrt", "train.warmup_steps=4"]).train
    factors = [lr_factor(s, tc, steps_per_epoch=10) for s in range(16)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[15] == pytest.approx((4 / 16) ** 0.5)
    assert all(a > b for a, b in itertools.pairwise(factors[3:]))


@pytest.mark.parametrize(
    ("source", "match"),
    [("gettext:git", "gettext:<domain>:<language>"),
     ("gettext:nosuchdomain:de", "no such gettext catalog")],
    ids=["gettext-name", "gettext-missing"],
)  # fmt: skip
def test_builtin_corpus_names_are_checked(tmp_path, source, match):
    cfg = config(source, "seq2seq")
    with pytest.raises(DataError, match=match):
        build_dataset(cfg.data, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()
