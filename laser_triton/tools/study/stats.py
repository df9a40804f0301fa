"""Paired statistics for the baseline-vs-LASER study, without scipy.

- Student's t distribution: CDF through the regularized incomplete beta function (continued
  fraction, modified Lentz), quantiles by bisection on the CDF.
- `paired_t_test`: H0 "mean difference = 0" on per-pair differences (a - b).
- `paired_tost`: two one-sided tests (Schuirmann 1987) for equivalence of a paired mean difference
  within [low, high]. Equivalence at level alpha holds exactly when the (1 - 2 alpha) confidence
  interval of the mean difference lies inside the margins.
- `relative_margin`: a margin declared as a fraction of the baseline's level.
- `seeds_for_tost`: the number of pairs a TOST needs for a given power, from a pilot's standard
  deviation of the differences (Chow, Shao & Wang, "Sample Size Calculations in Clinical
  Research", paired equivalence with the t approximation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["regularized_incomplete_beta", "student_t_cdf", "student_t_sf", "student_t_ppf",
           "PairedTTest", "paired_t_test", "TOSTResult", "paired_tost", "relative_margin",
           "seeds_for_tost", "tost_power", "NonInferiorityResult", "paired_noninferiority"]

_EPS = 3e-16
_TINY = 1e-300


def _beta_continued_fraction(a: float, b: float, x: float, max_iter: int = 10_000) -> float:
    """Continued fraction of I_x(a, b) (Numerical Recipes `betacf`), by modified Lentz."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) = B(x; a, b) / B(a, b) for a, b > 0 and 0 <= x <= 1."""
    if a <= 0 or b <= 0:
        raise ValueError(f"a and b must be > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x == 0.0 or x == 1.0:
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    # The fraction converges fast for x < (a+1)/(a+b+2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a)
    # on the other side.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom (df may be fractional, > 0)."""
    if df <= 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    # P(|T| > |t|) = I_{df/(df+t^2)}(df/2, 1/2); computing the tail directly keeps precision.
    tail = 0.5 * regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    return 1.0 - student_t_sf(t, df) if t >= 0 else student_t_sf(-t, df)


def student_t_ppf(p: float, df: float) -> float:
    """The quantile t with P(T <= t) = p, by bisection on the CDF (to ~1e-12 relative)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -student_t_ppf(1.0 - p, df)
    hi = 1.0
    while student_t_cdf(hi, df) < p:
        hi *= 2.0
    lo = 0.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    d = [x - y for x, y in zip(a, b)]
    if not all(math.isfinite(v) for v in d):
        raise ValueError("paired samples must be finite")
    return d


def _mean_sd(d: Sequence[float]) -> tuple[float, float]:
    n = len(d)
    mean = math.fsum(d) / n
    var = math.fsum((v - mean) ** 2 for v in d) / (n - 1)
    return mean, math.sqrt(var)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[int, float, float, float, int]:
    """n, mean, sd, standard error and degrees of freedom of the differences a_i - b_i."""
    d = _differences(a, b)
    n = len(d)
    mean, sd = _mean_sd(d)
    return n, mean, sd, sd / math.sqrt(n), n - 1


@dataclass(frozen=True)
class PairedTTest:
    """Paired t-test of mean(a - b) = 0. p_value follows `alternative`."""

    n: int
    mean_diff: float
    sd_diff: float
    se: float
    t: float
    df: int
    p_value: float
    ci_low: float  # (1 - alpha) two-sided confidence interval of the mean difference
    ci_high: float
    alternative: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_t_test(a: Sequence[float], b: Sequence[float], alternative: str = "two-sided",
                  alpha: float = 0.05) -> PairedTTest:
    """Student's paired t-test on differences a_i - b_i.

    alternative: 'two-sided', 'greater' (mean(a - b) > 0) or 'less'. When all differences are
    equal (se = 0), t is +-inf (p = 0), or nan with p = 1 when they are all zero.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    n, mean, sd, se, df = _paired(a, b)
    if se == 0.0:
        t = math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / se
    if math.isnan(t):
        p = 1.0
    elif alternative == "two-sided":
        p = min(1.0, 2.0 * student_t_sf(abs(t), df))
    elif alternative == "greater":
        p = student_t_sf(t, df)
    else:
        p = student_t_cdf(t, df)
    half = student_t_ppf(1.0 - alpha / 2.0, df) * se
    return PairedTTest(n, mean, sd, se, t, df, p, mean - half, mean + half, alternative)


@dataclass(frozen=True)
class TOSTResult:
    """Paired TOST: H0 "mean(a - b) <= low or >= high" against H1 "low < mean(a - b) < high"."""

    n: int
    mean_diff: float
    sd_diff: float
    se: float
    df: int
    low: float
    high: float
    t_low: float  # (mean - low) / se, tested for > 0
    p_low: float
    t_high: float  # (mean - high) / se, tested for < 0
    p_high: float
    p_value: float  # max(p_low, p_high)
    ci_low: float  # (1 - 2 alpha) confidence interval of the mean difference
    ci_high: float
    alpha: float
    equivalent: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_tost(a: Sequence[float], b: Sequence[float], low: float, high: float,
                alpha: float = 0.05) -> TOSTResult:
    """Two one-sided paired t-tests for equivalence of mean(a - b) within (low, high).

    Equivalence is declared when both one-sided p-values are below alpha, which is the same as
    the (1 - 2 alpha) confidence interval lying strictly inside (low, high).
    """
    if not low < high:
        raise ValueError(f"need low < high, got low={low}, high={high}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    n, mean, sd, se, df = _paired(a, b)

    def ratio(num: float) -> float:
        if se > 0:
            return num / se
        return math.copysign(math.inf, num) if num != 0 else 0.0

    t_low, t_high = ratio(mean - low), ratio(mean - high)
    p_low = student_t_sf(t_low, df)  # H0: mean <= low
    p_high = student_t_cdf(t_high, df)  # H0: mean >= high
    p = max(p_low, p_high)
    half = student_t_ppf(1.0 - alpha, df) * se
    return TOSTResult(n, mean, sd, se, df, low, high, t_low, p_low, t_high, p_high, p,
                      mean - half, mean + half, alpha, bool(p < alpha))


def relative_margin(baseline_level: float, fraction: float) -> tuple[float, float]:
    """Symmetric equivalence margins of +-fraction * |baseline level|."""
    if not fraction > 0:
        raise ValueError(f"fraction must be > 0, got {fraction}")
    if not math.isfinite(baseline_level) or baseline_level == 0:
        raise ValueError(f"the baseline level must be finite and non-zero, got {baseline_level}")
    m = fraction * abs(baseline_level)
    return -m, m


def seeds_for_tost(sd_diff: float, margin: float, alpha: float = 0.05, power: float = 0.8,
                   expected_diff: float = 0.0, min_n: int = 5, max_n: int = 1000) -> int:
    """Smallest n (>= min_n) such that a paired TOST with symmetric margin +-margin reaches
    `power` when the true difference is `expected_diff` and the differences' SD is sd_diff.

    t approximation (Chow, Shao & Wang §3.2): n >= (t_{1-alpha,n-1} + t_{1-beta',n-1})^2 sd^2 /
    (margin - |diff|)^2 with beta' = beta/2 when diff == 0 and beta otherwise. Returns max_n when
    even that is not enough (or the expected difference reaches the margin).
    """
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")
    room = margin - abs(expected_diff)
    if room <= 0:
        return max_n
    if sd_diff <= 0:
        return max(min_n, 2)
    beta = 1.0 - power
    beta_eff = beta / 2.0 if expected_diff == 0 else beta
    for n in range(max(min_n, 2), max_n + 1):
        need = (student_t_ppf(1 - alpha, n - 1) + student_t_ppf(1 - beta_eff, n - 1)) ** 2
        if n * room * room >= need * sd_diff * sd_diff:
            return n
    return max_n


def tost_power(sd_diff: float, margin: float, n: int, alpha: float = 0.05) -> float:
    """Approximate power of a paired TOST with symmetric margin +-margin at n pairs when the
    true difference is 0: 1 - 2 P(T_{n-1} > margin / se - t_{1-alpha,n-1}), floored at 0 (the
    t approximation `seeds_for_tost` inverts)."""
    if not margin > 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if n < 2:
        raise ValueError(f"need n >= 2 pairs, got {n}")
    if sd_diff <= 0:
        return 1.0
    x = margin / (sd_diff / math.sqrt(n)) - student_t_ppf(1 - alpha, n - 1)
    return max(0.0, 1.0 - 2.0 * student_t_sf(x, n - 1))


@dataclass(frozen=True)
class NonInferiorityResult:
    """One-sided paired test of H0 "mean(a - b) <= margin" against H1 "mean(a - b) > margin"
    (margin < 0: how much worse a may be). Non-inferiority holds at level alpha exactly when
    the one-sided (1 - alpha) lower confidence bound of the mean difference exceeds margin."""

    n: int
    mean_diff: float
    sd_diff: float
    se: float
    df: int
    margin: float
    t: float
    p_value: float
    lower_bound: float
    alpha: float
    non_inferior: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def paired_noninferiority(a: Sequence[float], b: Sequence[float], margin: float,
                          alpha: float = 0.05) -> NonInferiorityResult:
    """Paired one-sided t-test of mean(a - b) > margin (non-inferiority of a to b)."""
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
    if not math.isfinite(margin):
        raise ValueError(f"margin must be finite, got {margin}")
    n, mean, sd, se, df = _paired(a, b)
    if se > 0:
        t = (mean - margin) / se
    else:
        t = math.copysign(math.inf, mean - margin) if mean != margin else 0.0
    p = student_t_sf(t, df)
    lower = mean - student_t_ppf(1.0 - alpha, df) * se
    return NonInferiorityResult(n, mean, sd, se, df, margin, t, p, lower, alpha,
                                bool(p < alpha))
