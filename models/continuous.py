"""Continuous retraining: when enough new labels have landed in the lakehouse, enough time has
passed, or a feature of the serving version has drifted past a bound, retrain and publish only an
improvement (`--publish auto`)."""

from __future__ import annotations

from dataclasses import dataclass

from features.errors import ConfigError


@dataclass
class RetrainPolicy:
    """due() is true after `every_labels` new labels or `every_s` seconds since the last retrain, or
    when the serving version's largest feature PSI is above `drift_bound` and the last retrain is at
    least `drift_cooldown_s` old (a retrain that does not beat the champion leaves the drift in place;
    the cooldown keeps that from retraining in a loop). Any of the three may be None; the first call
    only records where counting starts."""

    every_labels: int | None = None
    every_s: float | None = None
    drift_bound: float | None = None
    drift_cooldown_s: float = 600.0
    _labels_at: int | None = None
    _time_at: float | None = None

    def __post_init__(self) -> None:
        if self.every_labels is None and self.every_s is None and self.drift_bound is None:
            raise ConfigError("continuous retraining needs EDDY_RETRAIN_EVERY_LABELS, EDDY_RETRAIN_EVERY "
                              "or EDDY_RETRAIN_ON_DRIFT")
        if (self.every_labels is not None and self.every_labels < 1) or (self.every_s is not None and self.every_s <= 0):
            raise ConfigError("EDDY_RETRAIN_EVERY_LABELS and EDDY_RETRAIN_EVERY must be positive")

    def due(self, labels: int, now: float, drift: float | None = None) -> bool:
        """`drift`: the serving version's largest feature PSI now (None: not measured)."""
        if self._labels_at is None or self._time_at is None:
            self._labels_at, self._time_at = labels, now
            return False
        return ((self.every_labels is not None and labels - self._labels_at >= self.every_labels)
                or (self.every_s is not None and now - self._time_at >= self.every_s)
                or (self.drift_bound is not None and drift is not None and drift > self.drift_bound
                    and now - self._time_at >= self.drift_cooldown_s))

    def done(self, labels: int, now: float) -> None:
        """A retrain started at this label count and time (whatever its outcome)."""
        self._labels_at, self._time_at = labels, now
