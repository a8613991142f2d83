"""A cost model fitted to the measured times: which candidates cannot beat the best found.

The time of a candidate relative to the baseline is modelled as a product of one factor
per technique it holds (and per power of its budget and density), that is a linear model
of the log time in the candidate's features (``space.features``), fitted by ridge least
squares to every candidate measured so far. A candidate is skipped only when the model has
seen each of its techniques measured, has more measurements than features, and predicts
it slower than the best found even at ``SKIP_SIGMAS`` residual deviations below its
prediction.
"""

from __future__ import annotations

import math

import numpy as np

SKIP_SIGMAS = 2.0
# Floor on the residual deviation (in log time): timings on a shared machine vary by a few
# per cent between identical runs, so a perfect fit is never taken at its word.
MIN_SIGMA = 0.05
RIDGE = 1e-3


class CostModel:
    def __init__(self):
        self.samples: list[tuple[dict[str, float], float]] = []  # (features, relative time)
        self.weights: dict[str, float] | None = None
        self.sigma = float("inf")

    def add(self, features: dict[str, float], relative_time: float) -> None:
        if relative_time > 0 and math.isfinite(relative_time):
            self.samples.append((features, relative_time))
            self.weights = None

    @property
    def names(self) -> list[str]:
        return sorted({name for features, _ in self.samples for name in features})

    def fit(self) -> None:
        names = self.names
        x = np.array([[1.0] + [features.get(n, 0.0) for n in names] for features, _ in self.samples])
        y = np.log([time for _, time in self.samples])
        weights = np.linalg.solve(x.T @ x + RIDGE * np.eye(x.shape[1]), x.T @ y)
        residual = y - x @ weights
        freedom = len(y) - x.shape[1]
        self.sigma = max(MIN_SIGMA, float(np.sqrt((residual ** 2).sum() / freedom))) if freedom > 0 else float("inf")
        self.weights = {"intercept": float(weights[0]), **dict(zip(names, map(float, weights[1:])))}

    def predict(self, features: dict[str, float]) -> float | None:
        """Predicted relative time, or None where the model cannot say (an unseen technique)."""
        if not self.samples or any(name not in self.names for name in features):
            return None
        if self.weights is None:
            self.fit()
        log_time = self.weights["intercept"] + sum(self.weights[n] * v for n, v in features.items())
        return math.exp(log_time)

    def cannot_win(self, features: dict[str, float], best: float) -> str | None:
        """Why a candidate cannot beat relative time ``best`` (a reason to skip it), or None."""
        predicted = self.predict(features)
        if predicted is None or not math.isfinite(self.sigma):
            return None
        optimistic = predicted * math.exp(-SKIP_SIGMAS * self.sigma)
        if optimistic <= best:
            return None
        return (f"cost model: predicted {predicted:.2f}x the baseline's time (at best {optimistic:.2f}x, "
                f"{SKIP_SIGMAS:g} deviations of its fit to {len(self.samples)} measurements), the best found takes "
                f"{best:.2f}x")
