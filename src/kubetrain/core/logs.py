"""Logging set-up shared by the CLI and the component entry points: plain lines, no colours.

In a KFP task (a component calls ``setup_logging`` first), a ``KubetrainError`` that ends the
step is printed as the one line the CLI would print, followed by one machine-readable line
(``ERROR_MARKER`` + JSON: error class, exit code, message). ``kubetrain run`` reads it from the
task's output and reports the step's own error with the right exit code; on a cluster the pod's
log says the same in two lines instead of a traceback. Other exceptions keep their traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from types import TracebackType

ERROR_MARKER = "kubetrain-step-error: "


def setup_logging(verbose: bool = False) -> None:
    """Log plain lines to stderr (DEBUG with ``verbose``, else INFO) and report a
    ``KubetrainError`` that ends the process as one line (see the module docstring)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("matplotlib", "PIL", "torch.distributed", "kfp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.excepthook = report_uncaught


def report_uncaught(
    kind: type[BaseException], err: BaseException, tb: TracebackType | None
) -> None:
    """``sys.excepthook``: a ``KubetrainError`` as one line plus its ERROR_MARKER record;
    anything else as Python prints it."""
    from kubetrain.core.errors import KubetrainError

    if not isinstance(err, KubetrainError):
        sys.__excepthook__(kind, err, tb)
        return
    record = {"type": kind.__name__, "exit_code": err.exit_code, "message": str(err)}
    sys.stderr.write(f"kubetrain: {err}\n{ERROR_MARKER}{json.dumps(record)}\n")
    sys.stderr.flush()
