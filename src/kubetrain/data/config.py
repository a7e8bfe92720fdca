"""The ``data`` config section: where the data comes from and how it is split, normalised and
augmented (used by ``kubetrain.data`` and the training loader)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from kubetrain.core.config import Section

# The special tokens every kubetrain tokenizer has, in this order (a trained one gets ids 0..4).
SPECIAL_TOKENS: dict[str, str] = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<s>",
    "eos": "</s>",
    "cls": "<cls>",
}
# Fewer pieces than this beyond the special tokens leaves no room for any real subword.
MIN_LEARNED_PIECES = 32


# The kinds data.task 'classification' covers; every other declared kind is a task of its own.
_CLASSIFICATION_KINDS = ("tabular", "images")


class TokenizerConfig(Section):
    """The tokenizer of text data: trained on the training split, or loaded from a file."""

    kind: Literal["bpe", "wordpiece", "unigram"] = Field(
        "bpe", description="Subword model trained on the training split (Hugging Face tokenizers)."
    )
    vocab_size: int = Field(
        8000, ge=1, le=1_000_000, description="Vocabulary size of a trained tokenizer."
    )
    min_frequency: int = Field(2, ge=1, description="Fewest occurrences of a merged piece (BPE).")
    lowercase: bool = Field(False, description="Lower-case text before tokenizing.")
    path: str | None = Field(
        None,
        description="A local tokenizer.json, or a directory holding one, to use instead of "
        "training; it must know the special tokens <pad> <unk> <s> </s> <cls>.",
    )
    sample_size: int = Field(
        500_000,
        ge=1_000,
        description="Rows of the training split a tokenizer is trained on (a seq2seq row gives "
        "its text and its target): all of them when the split has no more, else a seeded sample "
        "of this many (the same for every run and every data.parallel_tasks), read in source "
        "order. Preprocess holds the sample in memory while it reads.",
    )

    @model_validator(mode="after")
    def _room_for_pieces(self) -> TokenizerConfig:
        least = len(SPECIAL_TOKENS) + MIN_LEARNED_PIECES
        if self.path is None and self.vocab_size < least:
            raise ValueError(
                f"vocab_size {self.vocab_size} leaves no room beside the {len(SPECIAL_TOKENS)} "
                f"special tokens: use at least {least}"
            )
        return self


class TransformSpec(Section):
    """One ``torchvision.transforms.v2`` transform: its class name and keyword arguments."""

    name: str = Field(
        ..., min_length=1, description="A class of torchvision.transforms.v2 (e.g. RandomCrop)."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Its keyword arguments; a list of {name, kwargs} entries (the transforms of "
        "RandomApply, RandomChoice, ...) is built the same way.",
    )


class TransformsConfig(Section):
    """Image augmentation and preparation, applied per sample in the loader's workers."""

    train: list[TransformSpec] = Field(
        default_factory=list,
        description="Transforms of training images, in order. Images enter as uint8 tensors "
        "(C,H,W); a ToDtype(float32, scale=True) is added before the first Normalize (or at "
        "the end) unless the list has a ToDtype.",
    )
    eval: list[TransformSpec] = Field(
        default_factory=list,
        description="Transforms of validation/test images (deterministic: resize, crop, "
        "normalise), with the same ToDtype rule.",
    )
    batch: list[TransformSpec] = Field(
        default_factory=list,
        description="Transforms of whole training batches (MixUp, CutMix, RandomChoice of "
        "them); num_classes is filled in. data.mixup_alpha/cutmix_alpha are the short form.",
    )


class DataConfig(Section):
    """Where the data comes from and how it is split, normalised and augmented."""

    # How preprocess is spread over tasks, not what it makes: the dataset is the same for every
    # value, so a model's fingerprint (kubetrain.registry) leaves them out.
    RUN_ONLY_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"parallel_tasks", "max_parallel_tasks", "convert_retries", "shard_store"}
    )

    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's bundled 8x8 digits), or a path/URI (fsspec) to a "
        ".csv, .parquet or .npz file; a glob pattern reads several files in parallel. Images "
        "(the vision extra): an image-folder tree, a CSV/Parquet manifest with "
        "data.image_column, tar shards (brace patterns), a kubetrain sharded dataset "
        "(shards.json), or 'fashion-mnist' (Debian's dataset-fashion-mnist). Detection "
        "(data.task: detection): a COCO, Pascal VOC or YOLO folder, or 'fashion-mnist-scenes' "
        "(scenes composed from Fashion-MNIST items, data.limit of them).",
    )
    label_column: str = Field("label", description="Label column of tabular data (CSV/Parquet).")
    image_shape: list[int] | None = Field(
        None,
        description="C,H,W of image data given as flat feature columns (digits sets it itself).",
    )
    val_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for validation.")
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="Share of samples for test.")
    normalize: Literal["standard", "minmax", "none"] = Field(
        "standard", description="Per-feature normalisation, fitted on the training split only."
    )
    augment: bool = Field(False, description="Random shifts and noise on image training data.")
    augment_shift: int = Field(1, ge=0, le=8, description="Largest random shift in pixels.")
    augment_noise: float = Field(
        0.05, ge=0, description="Std of Gaussian noise (normalised units)."
    )
    num_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Parallel workers: files read at once in preprocess, DataLoader worker "
        "processes per rank in training (0 = in the main process).",
    )
    prefetch: int = Field(
        4,
        ge=0,
        le=64,
        description="Training batches prepared ahead of the step: by a background thread when "
        "num_workers is 0 (0 = no thread), per worker process otherwise (at least 1).",
    )
    seed: int = Field(0, description="Seed of the train/val/test split.")

    @field_validator("image_shape")
    @classmethod
    def _shape_is_positive(cls, shape: list[int] | None) -> list[int] | None:
        if shape is not None and (not shape or any(v < 1 for v in shape)):
            raise ValueError("every entry must be a positive integer, e.g. [1, 28, 28] (C,H,W)")
        return shape

    task: Literal["classification", "text_classification", "seq2seq", "detection"] = Field(
        "classification",
        description="'classification' (tabular or image features, the default), "
        "'text_classification' (text + label), 'seq2seq' (text -> target text: translation, "
        "summarization) or 'detection' (images with boxes: COCO, Pascal VOC or YOLO "
        "annotations; the vision extra).",
    )
    annotation_format: Literal["auto", "coco", "voc", "yolo"] = Field(
        "auto",
        description="Detection: how data.source's boxes are written. auto: from the layout "
        "(a .json file or annotations/instances_*.json: COCO; Annotations/*.xml: Pascal VOC; "
        "images/ + labels/ with data.yaml or classes.txt: YOLO).",
    )
    kind: Literal["auto", "tabular", "images", "text_classification", "seq2seq", "detection"] = (
        Field(
            "auto",
            description="What kind of dataset data.source is. auto: text kinds from data.task; "
            "for classification, images or tabular found by looking at the source when the "
            "pipeline runs (its name, one listing or one header). Declared, nothing is looked at "
            "for it: compiling and submitting a pipeline never read data either way (with auto, "
            "they take the promotion bar of data.task, and the image-only settings are checked "
            "when the steps run). A text kind, or detection, here sets data.task to it.",
        )
    )

    @model_validator(mode="after")
    def _kind_fits_task(self) -> DataConfig:
        if self.kind == "auto":
            return self
        if self.kind not in _CLASSIFICATION_KINDS and self.task == "classification":
            # ``data.kind: seq2seq`` alone says ``data.task: seq2seq`` too: a text kind is
            # never classification of features, so there is nothing else it could mean.
            self.__dict__["task"] = self.kind
            self.__pydantic_fields_set__.add("task")
        if self.kind in _CLASSIFICATION_KINDS:
            if self.task != "classification":
                raise ValueError(
                    f"data.kind {self.kind!r} is classification data; data.task is "
                    f"{self.task!r} (leave data.kind at auto, or set data.kind {self.task!r})"
                )
        elif self.kind != self.task:
            raise ValueError(f"data.kind {self.kind!r} and data.task {self.task!r} disagree")
        return self

    text_column: str = Field("text", description="Column of the input text (text tasks).")
    target_column: str = Field("target", description="Column of the output text of seq2seq pairs.")
    max_length: int = Field(
        128,
        ge=4,
        le=65536,
        description="Most tokens per sequence, special tokens included (text tasks); longer "
        "text is truncated and counted in a warning. The model's max_len must be at least this.",
    )
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig, description="Tokenizer of text tasks."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for data.source and the shards (e.g. endpoint_url, "
        "key/secret for s3://). Prefer the environment for credentials (AWS_ACCESS_KEY_ID, "
        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS): s3fs and "
        "gcsfs read them, and they stay out of the run's recorded config.",
    )
    image_column: str = Field(
        "image",
        min_length=1,
        description="Column of a CSV/Parquet image manifest holding each image's path or URI "
        "(relative paths are relative to the manifest's folder).",
    )
    image_size: int | None = Field(
        None,
        ge=8,
        le=4096,
        description="Resize images when the shards are written: the shorter side to this many "
        "pixels (aspect kept), then centre-cropped to a square, so every stored image has one "
        "shape (None: stored as they are).",
    )
    max_image_pixels: int | None = Field(
        64_000_000,
        ge=1,
        description="Images whose header declares more pixels than this (width x height) are "
        "skipped and counted like corrupt ones, before a byte is decoded: a small PNG can "
        "declare 12 000 x 12 000 pixels and take 8 GB to decode. The default, 64 MP, takes "
        "any camera's photo; None: no limit.",
    )
    image_mode: Literal["RGB", "L"] = Field(
        "RGB",
        description="Colour mode every image is converted to when the shards are written "
        "(grayscale, palette, RGBA and 16-bit images included): 'RGB' (3 channels) or 'L'.",
    )
    limit: int | None = Field(
        None,
        ge=10,
        description="Built-in image sets ('fashion-mnist'): use at most this many images, the "
        "same number of each class (None: all of them); 'fashion-mnist-scenes': how many "
        "scenes to compose (None: 1000).",
    )
    shard_samples: int = Field(
        2048,
        ge=1,
        description="Samples (images, or token sequences of text tasks) per shard file of the "
        "sharded dataset (the unit of parallel preprocessing and of streaming).",
    )
    transforms: TransformsConfig = Field(
        default_factory=TransformsConfig,
        description="torchvision.transforms.v2 pipelines for images: train, eval, batch.",
    )
    mixup_alpha: float = Field(
        0.0, ge=0, description="MixUp's Beta(alpha, alpha) on training batches (0 = off)."
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        description="CutMix's Beta(alpha, alpha) on training batches (0 = off); with "
        "mixup_alpha too, each batch gets one of the two at random.",
    )
    parallel_tasks: int = Field(
        1,
        ge=1,
        le=256,
        description="Preprocess fanned out over this many convert tasks: a plan task lists the "
        "source, draws the split and fixes the shards, each convert task (a dsl.ParallelFor "
        "iteration) decodes or tokenizes a contiguous range of them, a merge task checks every "
        "range is there and writes the manifest, statistics and version. The dataset is the same "
        "for every value; 1: one preprocess task. Images, text and detection; tables are built whole "
        "by the merge task. Fixed when the pipeline is compiled.",
    )
    max_parallel_tasks: int = Field(
        0,
        ge=0,
        le=256,
        description="Convert tasks running at once (the ParallelFor's parallelism; 0: all "
        "data.parallel_tasks). kfp.local runs at most 2 at once whatever it is.",
    )
    convert_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Times a failed convert task is retried (KFP's set_retry, with back-off) "
        "before the run fails.",
    )
    shard_store: str | None = Field(
        None,
        description="Where convert tasks write the shards when data.parallel_tasks > 1: a "
        "directory on the cluster's claim (below cluster.mount_path) or an fsspec URI "
        "(s3://bucket/datasets, with data.storage_options); the dataset goes to "
        "<shard_store>/<input fingerprint>/ and training streams from there. None: each convert "
        "task's shards are its output artifact, and merge gathers them into the dataset's.",
    )
