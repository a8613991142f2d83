"""``cadence tune``: the fastest composition of the registered techniques that meets a
quality bar, searched on the user's own pipeline and device (search.py says how)."""

from cadence.tune.search import TuneRefused, TuneResult, TuneSettings, tune

__all__ = ["TuneRefused", "TuneResult", "TuneSettings", "tune"]
