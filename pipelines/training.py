"""preprocess -> tune -> train -> quantize -> evaluate -> [promote | reject].

The pipeline is built from a config: each step receives only the config sections it uses, so a
change to, say, ``quantize.method`` re-runs quantize and evaluate and takes the rest from cache.
``min_accuracy`` stays a run-time parameter: the promotion bar can change without recompiling.

(No ``from __future__ import annotations`` here: KFP reads the annotations as real types.)
"""

from typing import NamedTuple

from kfp import dsl

from kubetrain import components as c
from kubetrain.config import PipelineConfig

PIPELINE_NAME = "kubetrain"


def build_pipeline(cfg: PipelineConfig):
    """Return the ``@dsl.pipeline`` function for ``cfg`` (compile it or run it under kfp.local)."""
    cfg_data = cfg.sections_json("data")
    cfg_train = cfg.sections_json("data", "model", "train", "cluster")
    cfg_tune = cfg.sections_json("data", "model", "train", "tune", "cluster")
    cfg_quantize = cfg.sections_json("quantize")
    cfg_evaluate = cfg.sections_json("evaluate")

    class Outputs(NamedTuple):
        evaluation: dsl.Artifact
        promoted: bool

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Tune, train (DDP), quantize (int8) and evaluate a model; promote it if it "
        "clears the accuracy bar.",
    )
    def kubetrain_pipeline(min_accuracy: float = cfg.evaluate.min_accuracy) -> Outputs:
        prep = c.preprocess(config_json=cfg_data).set_display_name("preprocess")
        search = c.tune(config_json=cfg_tune, dataset=prep.outputs["dataset"])
        search.set_display_name("tune")
        fit = c.train(
            config_json=cfg_train,
            dataset=prep.outputs["dataset"],
            best_params=search.outputs["best_params"],
        ).set_display_name("train")
        quant = c.quantize(
            config_json=cfg_quantize, dataset=prep.outputs["dataset"], model=fit.outputs["model"]
        )
        quant.set_display_name("quantize")
        ev = c.evaluate(
            config_json=cfg_evaluate,
            min_accuracy=min_accuracy,
            dataset=prep.outputs["dataset"],
            model=fit.outputs["model"],
            quantized=quant.outputs["quantized"],
            best_params=search.outputs["best_params"],
        ).set_display_name("evaluate")
        gate = c.check_accuracy(evaluation=ev.outputs["evaluation"], min_accuracy=min_accuracy)
        gate.set_display_name("check-accuracy")
        # Gate on the component's single return value: dsl.If on a *named* output of a
        # NamedTuple silently evaluates false under kfp.local.
        with dsl.If(gate.output == True, name="accuracy-ok"):  # noqa: E712 (a KFP expression)
            c.promote(
                model=fit.outputs["model"],
                quantized=quant.outputs["quantized"],
                evaluation=ev.outputs["evaluation"],
            ).set_display_name("promote")
        with dsl.Else(name="accuracy-low"):
            c.reject(evaluation=ev.outputs["evaluation"], min_accuracy=min_accuracy)
        return Outputs(evaluation=ev.outputs["evaluation"], promoted=gate.output)

    return kubetrain_pipeline
