"""KFP components: thin adapters, one module per step. Each maps artifacts and parameters to one
call into ``kubetrain.pipeline.steps``; there is no ML logic here. Installed as ``kubetrain.components``.
"""

from kubetrain.components.evaluate import evaluate
from kubetrain.components.gate import check_accuracy, check_changed, promote, reject
from kubetrain.components.params import run_params
from kubetrain.components.preprocess import (
    preprocess,
    preprocess_convert,
    preprocess_merge,
    preprocess_plan,
)
from kubetrain.components.quantize import quantize
from kubetrain.components.track import track
from kubetrain.components.train import train
from kubetrain.components.tune import tune

__all__ = [
    "check_accuracy",
    "check_changed",
    "evaluate",
    "preprocess",
    "preprocess_convert",
    "preprocess_merge",
    "preprocess_plan",
    "promote",
    "quantize",
    "reject",
    "run_params",
    "track",
    "train",
    "tune",
]
