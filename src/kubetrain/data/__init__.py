"""Data: sources, the versioned dataset artifact, augmentation and loaders."""

from kubetrain.data.dataset import DatasetArtifact, build_dataset, load_dataset

__all__ = ["DatasetArtifact", "build_dataset", "load_dataset"]
