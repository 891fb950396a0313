"""One base class for every error the engine reports to a user as a single line."""


class EngineError(Exception):
    """A user-facing problem (bad config, bad dataset, missing weights...). str(e) is one line."""


class RunError(EngineError):
    """The run cannot start or resume (name taken, nothing to resume, already completed, no data...)."""
