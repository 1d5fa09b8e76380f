"""The error a training run reports when it cannot start or resume."""


class TrainError(ValueError):
    """A training run that cannot start or resume; the message says what to change."""
