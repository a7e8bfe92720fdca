"""IDX files (the MNIST family's format) as arrays and as an image folder.

Debian's ``dataset-fashion-mnist`` ships Fashion-MNIST (70 000 grayscale 28x28 images, 10
classes) as gzipped IDX files under ``/usr/share/datasets/fashion-mnist``: a real image set
available offline. ``idx_to_image_folder`` writes it as the image-folder tree that
``build_image_dataset`` reads, so the real set takes the same path as a user's images.
"""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import numpy as np

from kubetrain.core.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# The classes in label order (the dataset's README); folder-safe ("T-shirt/top" has a slash).
FASHION_MNIST_CLASSES = (
    "tshirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """The array an IDX file holds (gzipped or not).

    Args:
        path: an IDX file (``*-idx3-ubyte``, ``*-idx1-ubyte``, optionally ``.gz``).

    Returns:
        The array with the file's shape and element type (native byte order).

    Raises:
        DataError: the file is missing, not IDX, or shorter than its header says.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data error: {path}: not found") from None
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.GzipFile(fileobj=io.BytesIO(raw)).read()
    if len(raw) < 4 or raw[0] or raw[1] or raw[2] not in _DTYPES:
        raise DataError(f"data error: {path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, ">i4", count=ndim, offset=4)
    dtype = np.dtype(_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    count = int(np.prod(dims))
    if len(raw) - offset < count * dtype.itemsize:
        raise DataError(f"data error: {path}: truncated (header says {tuple(dims)})")
    data = np.frombuffer(raw, dtype, count=count, offset=offset)
    return data.reshape(tuple(int(d) for d in dims)).astype(dtype.newbyteorder("="))


def fashion_mnist_files(split: str = "train", root: Path = FASHION_MNIST_DIR) -> tuple[Path, Path]:
    """``(images, labels)`` IDX paths of Fashion-MNIST's ``train`` or ``t10k`` split.

    Raises:
        DataError: the files are not installed (``apt-get install dataset-fashion-mnist``).
    """
    images = root / f"{split}-images-idx3-ubyte.gz"
    labels = root / f"{split}-labels-idx1-ubyte.gz"
    if not (images.exists() and labels.exists()):
        raise DataError(
            f"data error: {images}: Fashion-MNIST is not installed "
            "(apt-get install dataset-fashion-mnist)"
        )
    return images, labels


def idx_to_image_folder(
    images: str | Path,
    labels: str | Path,
    out_dir: str | Path,
    class_names: tuple[str, ...] | list[str] | None = None,
    per_class: int | None = None,
) -> dict[str, int]:
    """Write the images of an IDX pair as PNG files in one folder per class.

    Args:
        images: IDX file of N grayscale images (N, H, W), uint8.
        labels: IDX file of N integer labels.
        out_dir: the image-folder root to write (``<class>/<index>.png``).
        class_names: folder name of each label (default: the label number).
        per_class: at most this many images of each class, the first ones in file order.

    Returns:
        Images written per class folder.

    Raises:
        DataError: the files disagree in length, or are not 8-bit image and label arrays.
    """
    from PIL import Image

    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or x.dtype != np.uint8 or y.ndim != 1 or len(x) != len(y):
        raise DataError(
            f"data error: {images}, {labels}: expected (N,H,W) uint8 images and N labels, got "
            f"{x.shape} {x.dtype} and {y.shape}"
        )
    out = Path(out_dir)
    written: dict[str, int] = {}
    for index, (pixels, label) in enumerate(zip(x, y, strict=True)):
        name = class_names[int(label)] if class_names else str(int(label))
        if per_class is not None and written.get(name, 0) >= per_class:
            continue
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{index:06d}.png")
        written[name] = written.get(name, 0) + 1
    return written
