"""License-plate detector engine: train, evaluate, predict and report (python -m engine ...)."""

__version__ = "0.1.0"
