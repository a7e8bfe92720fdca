"""Logging set-up shared by the CLI and the component entry points: plain lines, no colours."""

from __future__ import annotations

import logging
import sys


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    for noisy in ("matplotlib", "PIL", "torch.distributed", "kfp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
