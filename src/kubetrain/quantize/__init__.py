"""fp32 -> int8 with an accuracy gate; the artifact reloads without kubetrain's code.

``quantize_artifact`` builds each candidate (``methods``), reloads it from its saved artifact,
measures it against fp32 on the validation split (accuracy, size, batch-1/batch-64 latency side
by side), applies the gate and the ``auto`` choice (``select``), and writes the chosen artifact
(``artifact``) plus every candidate's numbers to ``quant.json``.

Artifact directory: ``model.pt2`` (a ``torch.export`` program) or ``model.ts`` (TorchScript, the
fbgemm backend only) and ``quant.json`` (how to run it; written last). Reload it anywhere with
``load_quantized`` or with plain torch (see ``artifact``). Text models (token-id inputs) get
int8 Linear layers only and are saved as an int8 state dict (``model_state.pt``) that
``load_quantized`` loads into the rebuilt fp32 network: a seq2seq model decodes through
``encode``/``decode``, which an exported ``forward`` graph does not keep.

The names below are loaded on first use (``driver`` imports torch), so that importing the
``quantize`` config section (``config``) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "load_quantized", "quantize_artifact"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from kubetrain.quantize import driver

        return getattr(driver, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
