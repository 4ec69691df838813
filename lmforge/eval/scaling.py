"""Scaling-law math: Kaplan power laws, the Chinchilla L(N, D) fit, bootstrap intervals, compute-optimal sizes.

    from lmforge.eval.scaling import fit_chinchilla, fit_power_law, compute_optimal, bootstrap_chinchilla
    fit = fit_chinchilla(N, D, L)                 # L(N, D) = E + A / N^alpha + B / D^beta
    n_opt, d_opt = compute_optimal(fit, 1e15)     # the minimum of L(N, D) under C = 6 N D
    km = fit_power_law(N, L)                      # Kaplan et al. 2020: L(N) = (N_c / N)^alpha_N

`lmforge scaling fit` (lmforge/eval/scaling_cmd.py) reads the runs and calls these; they are pure functions of
numpy arrays (numpy and scipy, no torch), tested on synthetic laws in tests/test_scaling.py.

Two forms, two conventions for N, as the papers use them:
- Kaplan et al. 2020 ("KM"): L(N) = (N_c/N)^alpha_N and L(D) = (D_c/D)^alpha_D, pure power laws with no
  irreducible term, with N the non-embedding parameter count. Fitted here by least squares on log L vs log x
  (a straight line in log-log space), which is what the form is.
- Hoffmann et al. 2022 ("Chinchilla", approach 3): L(N, D) = E + A/N^alpha + B/D^beta with N all parameters,
  fitted by minimizing sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i), delta = 1e-3,
  with L-BFGS, A = exp(a), B = exp(b), E = exp(e). Deviation: the paper starts L-BFGS from every point of its
  initialisation grid; here the whole grid is scored (one vectorized pass) and L-BFGS starts from the best
  `n_starts` points only, which finds the same minimum at a fraction of the cost (the bootstrap refits hundreds
  of times). The tolerances are tight because Besiroglu et al. 2024 ("Chinchilla scaling: a replication
  attempt") traced the paper's implausibly narrow intervals to an optimizer that stopped early: with
  delta = 1e-3 the objective is ~1e-4, below scipy's default stopping thresholds.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np

HUBER_DELTA = 1e-3  # Hoffmann et al. 2022, approach 3
# Approach 3's initialisation grid: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}.
GRID = {
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}
THETA = ("a", "b", "e", "alpha", "beta")  # the order of the parameter vector


@dataclass(frozen=True)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, and the Huber objective it reached."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # sum of Huber losses on log L at the optimum

    @property
    def theta(self) -> np.ndarray:
        return np.array([math.log(self.A), math.log(self.B), math.log(self.E), self.alpha, self.beta])

    def loss(self, n, d):
        """The fitted loss at parameters n and tokens d (scalars or arrays)."""
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PowerLaw:
    """Kaplan's pure power law L(x) = (x_c / x)^alpha, and the RMS residual of its fit in log L."""

    x_c: float
    alpha: float
    rms_log_residual: float

    def loss(self, x):
        return (self.x_c / np.asarray(x, dtype=float)) ** self.alpha

    def to_dict(self) -> dict:
        return asdict(self)


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """Huber loss of residuals r, elementwise, and its derivative: r^2/2 within delta, delta(|r| - delta/2) beyond."""
    a = np.abs(r)
    value = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))
    return value, np.clip(r, -delta, delta)


def chinchilla_objective(theta, log_n, log_d, log_l, delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """Approach 3's objective at theta = (a, b, e, alpha, beta) and its gradient.

    The prediction in log space is LSE(a - alpha log N, b - beta log D, e) = log(A/N^alpha + B/D^beta + E),
    computed stably; its gradient is the softmax of the three terms. Written out rather than through `huber`
    (the same values: huber(r) = clip(r) * (r - clip(r)/2)) because L-BFGS calls it thousands of times per fit.
    """
    a, b, e, alpha, beta = theta
    t1, t2 = a - alpha * log_n, b - beta * log_d
    top = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = w1 + w2 + w3
    r = top + np.log(total) - log_l
    dr = np.clip(r, -delta, delta)
    g = dr / total  # d Huber / d term_k = huber'(r) * softmax_k
    g1, g2 = g * w1, g * w2
    grad = np.array([g1.sum(), g2.sum(), g @ w3, -(g1 @ log_n), -(g2 @ log_d)])
    return float(dr @ (r - 0.5 * dr)), grad


def init_grid() -> np.ndarray:
    """Every initialisation of approach 3's grid as rows (a, b, e, alpha, beta): 6 * 6 * 5 * 5 * 5 = 4500."""
    mesh = np.meshgrid(*(GRID[k] for k in THETA), indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


def _grid_objective(grid: np.ndarray, log_n, log_d, log_l, delta: float) -> np.ndarray:
    """The objective at every row of `grid` at once (no gradient): which starting points are worth refining."""
    a, b, e, alpha, beta = (grid[:, i : i + 1] for i in range(5))
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(grid), len(log_n)))])
    pred = np.logaddexp(np.logaddexp(terms[0], terms[1]), terms[2])
    return huber(pred - log_l, delta)[0].sum(axis=1)


def _check_points(n, d, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, d, loss = (np.asarray(x, dtype=float).ravel() for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError("N, D and L must have the same length")
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise ValueError("N, D and L must be positive")
    return n, d, loss


def identifiable(n, d) -> str | None:
    """Why runs at sizes n and token counts d cannot determine L(N, D), or None if they can.

    Besides 5 runs for 5 parameters, each exponent needs 3 distinct values of its variable: with two token
    counts only the difference B (D1^-beta - D2^-beta) is seen, and every beta fits as well as any other
    (E and B absorb it).
    """
    if len(n) < 5:
        return f"L(N, D) has 5 parameters; {len(n)} runs cannot determine them"
    for values, name in ((n, "sizes N"), (d, "token counts D")):
        if len(np.unique(values)) < 3:
            return f"L(N, D) needs at least 3 distinct {name} (an exponent from 2 values is undetermined)"
    return None


def _one_blas_thread():
    """A context in which BLAS runs on one thread. scipy's L-BFGS-B calls BLAS on 5-vectors: with OpenBLAS's
    threads waking for each call on busy cores a fit took 1 s instead of 0.05 s. threadpoolctl is optional
    (scikit-learn's dependency); without it the fit is the same, only slower on a loaded machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def fit_chinchilla(n, d, loss, *, delta: float = HUBER_DELTA, n_starts: int = 8, starts=None) -> ChinchillaFit:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta to runs (N parameters, D tokens, L final loss), approach 3.

    L-BFGS starts from the `n_starts` best points of the initialisation grid, plus any rows of `starts`
    (a warm start: the bootstrap passes the full-data fit); the lowest objective wins.
    """
    from scipy.optimize import minimize

    n, d, loss = _check_points(n, d, loss)
    problem = identifiable(n, d)
    if problem:
        raise ValueError(problem)
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
    grid = init_grid()
    best = np.argsort(_grid_objective(grid, log_n, log_d, log_l, delta))[:n_starts]
    candidates = list(grid[best]) + [np.asarray(s, dtype=float) for s in (starts if starts is not None else [])]
    # The objective is a sum of ~1e-7 terms: scale it so L-BFGS's absolute thresholds mean something.
    scale = 1.0 / (delta * delta * len(n))
    result = None
    with _one_blas_thread():
        for x0 in candidates:
            r = minimize(lambda t: tuple(v * scale for v in chinchilla_objective(t, log_n, log_d, log_l, delta)), x0,
                         jac=True, method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-10, "gtol": 1e-7})  # fmt: skip
            if np.all(np.isfinite(r.x)) and (result is None or r.fun < result.fun):
                result = r
    with np.errstate(over="ignore"):  # a degenerate fit (a term the data cannot see) may run off: inf, not a crash
        big_a, big_b, big_e = (float(v) for v in np.exp(result.x[:3]))  # THETA order: a, b, e
    return ChinchillaFit(E=big_e, A=big_a, B=big_b, alpha=float(result.x[3]), beta=float(result.x[4]),
                         objective=float(result.fun / scale))  # fmt: skip


def fit_power_law(x, loss) -> PowerLaw:
    """Kaplan's L(x) = (x_c / x)^alpha by least squares on log L = alpha log x_c - alpha log x."""
    x, loss = np.asarray(x, dtype=float).ravel(), np.asarray(loss, dtype=float).ravel()
    if len(np.unique(x)) < 2:
        raise ValueError("a power law needs at least two distinct sizes")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    alpha = -slope
    resid = np.log(loss) - (intercept + slope * np.log(x))
    # alpha = 0 (a flat line) has no x_c; report an infinite one rather than dividing by zero.
    x_c = math.exp(intercept / alpha) if alpha != 0 else math.inf
    return PowerLaw(x_c=x_c, alpha=float(alpha), rms_log_residual=float(np.sqrt(np.mean(resid**2))))


def compute_optimal(fit: ChinchillaFit, flops, flops_per_param_token: float = 6.0) -> tuple[float, float]:
    """The N and D that minimize the fitted L(N, D) under C = k N D (k = 6 as in Chinchilla), closed form:

    N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), D_opt = (C/k) / N_opt.
    """
    a, b = fit.alpha, fit.beta
    nd = np.asarray(flops, dtype=float) / flops_per_param_token
    if a <= 0 or b <= 0:  # loss that does not fall with N (or D) has no optimum: say so with NaN
        return nd * math.nan, nd * math.nan
    # In logs: a bootstrap refit can have A or B of 1e300, whose powers overflow a float.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        log_g = (np.log(a) + np.log(fit.A) - np.log(b) - np.log(fit.B)) / (a + b)
        n_opt = np.exp(log_g + b / (a + b) * np.log(nd))
    return n_opt, nd / n_opt


def longest_per_size(n, d) -> np.ndarray:
    """Indices of Kaplan's L(N) points: for each distinct N, the run with the most tokens (the nearest to
    training to convergence that the sweep has)."""
    n, d = np.asarray(n), np.asarray(d)
    return np.array(sorted(max(np.flatnonzero(n == size), key=lambda i: d[i]) for size in np.unique(n)))


def runs_of_largest(n) -> np.ndarray:
    """Indices of Kaplan's L(D) points: the runs of the largest model (the least limited by its size)."""
    n = np.asarray(n)
    return np.flatnonzero(n == n.max())


def interval(samples, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap samples (nan when there are none)."""
    samples = np.asarray(samples, dtype=float)
    samples = samples[np.isfinite(samples)]
    if len(samples) == 0:
        return math.nan, math.nan
    tail = 50 * (1 - level)
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def _resamples(count: int, resamples: int, seed: int, usable) -> list[np.ndarray]:
    """`resamples` index arrays drawn with replacement from range(count), skipping draws `usable` rejects (a draw
    with a single distinct N cannot fit an exponent of N); gives up after 20x as many draws."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(20 * resamples):
        idx = rng.integers(0, count, size=count)
        if usable(idx):
            out.append(idx)
            if len(out) == resamples:
                break
    return out


def bootstrap_chinchilla(n, d, loss, fit: ChinchillaFit, *, resamples: int = 200, seed: int = 0,
                         n_starts: int = 1, delta: float = HUBER_DELTA) -> list[ChinchillaFit]:  # fmt: skip
    """Refits of L(N, D) on runs resampled with replacement (warm-started from `fit`): their spread is the
    uncertainty of each parameter. Draws with fewer than 3 distinct N or D are redrawn (see `identifiable`)."""
    n, d, loss = _check_points(n, d, loss)

    def usable(idx):
        return len(np.unique(n[idx])) >= 3 and len(np.unique(d[idx])) >= 3

    return [fit_chinchilla(n[i], d[i], loss[i], delta=delta, n_starts=n_starts, starts=[fit.theta])
            for i in _resamples(len(n), resamples, seed, usable)]  # fmt: skip


def bootstrap_power_law(x, loss, *, resamples: int = 200, seed: int = 0) -> list[PowerLaw]:
    """Refits of a Kaplan power law on points resampled with replacement (at least 2 distinct x each)."""
    x, loss = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    return [fit_power_law(x[i], loss[i])
            for i in _resamples(len(x), resamples, seed, lambda idx: len(np.unique(x[idx])) >= 2)]  # fmt: skip


def summarize(fit, samples: list, fields: tuple[str, ...], level: float = 0.95) -> dict:
    """{field: {"value", "lo", "hi"}}: the fit's value and the bootstrap interval of each field."""
    out = {}
    for name in fields:
        lo, hi = interval([getattr(s, name) for s in samples], level)
        out[name] = {"value": getattr(fit, name), "lo": lo, "hi": hi}
    return out
