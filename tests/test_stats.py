"""Statistics against textbook values: t quantiles, Student's sleep data, Darwin's Zea mays."""

from __future__ import annotations

import math

import numpy as np
import pytest

from laser_triton.tools.study import stats

# Student (1908) / Cushny & Peebles: extra hours of sleep under two drugs, same 10 patients.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
# Darwin's Zea mays, as analysed by Fisher (1935): cross- minus self-fertilised heights (1/8 in).
DARWIN = [49, -67, 8, 16, 6, 23, 28, 41, 14, 29, 56, 24, 75, 60, -48]


@pytest.mark.parametrize("a,b,x,expected", [
    (2.0, 1.0, 0.3, 0.3 ** 2),  # I_x(a, 1) = x^a
    (1.0, 3.0, 0.4, 1 - 0.6 ** 3),  # I_x(1, b) = 1 - (1-x)^b
    (5.0, 5.0, 0.5, 0.5),  # symmetry
    (0.5, 0.5, 0.25, 2 / math.pi * math.asin(0.5)),  # arcsine distribution
    (30.0, 40.0, 0.7, None),
])
def test_incomplete_beta_closed_forms(a, b, x, expected):
    v = stats.regularized_incomplete_beta(a, b, x)
    if expected is None:  # I_x(a,b) + I_{1-x}(b,a) = 1
        expected = 1 - stats.regularized_incomplete_beta(b, a, 1 - x)
    assert v == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_incomplete_beta_rejects_bad_arguments():
    with pytest.raises(ValueError):
        stats.regularized_incomplete_beta(0.0, 1.0, 0.5)
    with pytest.raises(ValueError):
        stats.regularized_incomplete_beta(1.0, 1.0, 1.5)


@pytest.mark.parametrize("t,df,expected", [
    (1.0, 1, 0.75),  # Cauchy: 1/2 + atan(t)/pi
    (-2.0, 1, 0.5 + math.atan(-2.0) / math.pi),
    (1.5, 2, 0.5 + 1.5 / (2 * math.sqrt(2 + 1.5 ** 2))),  # df=2 closed form
    (0.0, 7, 0.5),
])
def test_t_cdf_closed_forms(t, df, expected):
    assert stats.student_t_cdf(t, df) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("p,df,expected", [
    # Standard t-table values (e.g. Abramowitz & Stegun table 26.10).
    (0.975, 1, 12.7062047362),
    (0.975, 9, 2.2621571628),
    (0.95, 4, 2.1318467863),
    (0.975, 30, 2.0422724563),
    (0.995, 10, 3.1692726726),
    (0.90, 120, 1.2886462382),
])
def test_t_quantiles_match_tables(p, df, expected):
    q = stats.student_t_ppf(p, df)
    assert q == pytest.approx(expected, rel=1e-8)
    assert stats.student_t_cdf(q, df) == pytest.approx(p, rel=1e-12)
    assert stats.student_t_ppf(1 - p, df) == pytest.approx(-expected, rel=1e-8)


def test_t_large_df_approaches_normal():
    assert stats.student_t_ppf(0.975, 1e7) == pytest.approx(1.959963985, rel=1e-6)
    assert stats.student_t_sf(8.0, 1e6) == pytest.approx(6.22e-16, rel=0.02)


def test_paired_t_sleep_data():
    # R: t.test(extra ~ group, data = sleep, paired = TRUE)
    r = stats.paired_t_test(SLEEP_1, SLEEP_2)
    assert r.n == 10 and r.df == 9
    assert r.mean_diff == pytest.approx(-1.58)
    assert r.t == pytest.approx(-4.0621, abs=1e-4)
    assert r.p_value == pytest.approx(0.002833, abs=1e-6)
    assert r.ci_low == pytest.approx(-2.4598858, abs=1e-6)
    assert r.ci_high == pytest.approx(-0.7001142, abs=1e-6)
    assert stats.paired_t_test(SLEEP_1, SLEEP_2, "less").p_value == pytest.approx(0.002833 / 2, abs=1e-6)
    assert stats.paired_t_test(SLEEP_1, SLEEP_2, "greater").p_value == pytest.approx(1 - 0.002833 / 2, abs=1e-6)


def test_paired_t_darwin_zea_mays():
    # Fisher's analysis of Darwin's data: t = 2.148 on 14 df, p ~ 0.0497 (two-sided).
    r = stats.paired_t_test(DARWIN, [0] * len(DARWIN))
    assert r.mean_diff == pytest.approx(20.9333, abs=1e-4)
    assert r.sd_diff == pytest.approx(37.744, abs=1e-3)
    assert r.t == pytest.approx(2.148, abs=1e-3)
    assert r.p_value == pytest.approx(0.0497, abs=1e-4)


def test_paired_t_degenerate_and_invalid():
    r = stats.paired_t_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert math.isnan(r.t) and r.p_value == 1.0
    r = stats.paired_t_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert r.t == math.inf and r.p_value == 0.0
    with pytest.raises(ValueError):
        stats.paired_t_test([1.0], [2.0])
    with pytest.raises(ValueError):
        stats.paired_t_test([1.0, 2.0], [2.0])
    with pytest.raises(ValueError):
        stats.paired_t_test([1.0, math.nan], [2.0, 1.0])


def test_tost_sleep_data_by_definition():
    # Margins +-2 hours: mean -1.58, se 0.38896 -> lower test t = 1.0798 (p ~ 0.154): not equivalent.
    r = stats.paired_tost(SLEEP_1, SLEEP_2, -2.0, 2.0)
    assert r.t_low == pytest.approx((-1.58 + 2) / 0.3889587, rel=1e-5)
    assert r.p_low == pytest.approx(stats.student_t_sf(r.t_low, 9), rel=1e-12)
    assert r.t_high == pytest.approx((-1.58 - 2) / 0.3889587, rel=1e-5)
    assert r.p_value == pytest.approx(0.154, abs=1e-3)
    assert not r.equivalent
    # 90% CI: mean -+ t_{0.95,9} se = -1.58 -+ 1.833113 * 0.3889587
    assert r.ci_low == pytest.approx(-1.58 - 1.833113 * 0.3889587, abs=1e-5)
    wide = stats.paired_tost(SLEEP_1, SLEEP_2, -3.0, 3.0)
    assert wide.equivalent and wide.p_value < 0.05


@pytest.mark.parametrize("seed", range(5))
def test_tost_is_dual_to_the_90_percent_interval(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 1, 8)
    b = a + rng.normal(0.05, 0.1, 8)
    for m in (0.05, 0.1, 0.2, 0.4):
        r = stats.paired_tost(a, b, -m, m)
        assert r.equivalent == (-m < r.ci_low and r.ci_high < m)


def test_tost_invalid_arguments():
    with pytest.raises(ValueError):
        stats.paired_tost([1, 2], [1, 2], 0.1, -0.1)
    with pytest.raises(ValueError):
        stats.paired_tost([1, 2], [1, 2], -0.1, 0.1, alpha=0.6)


def test_relative_margin():
    assert stats.relative_margin(0.8, 0.02) == pytest.approx((-0.016, 0.016))
    assert stats.relative_margin(-2.0, 0.1) == pytest.approx((-0.2, 0.2))
    with pytest.raises(ValueError):
        stats.relative_margin(0.0, 0.1)


def test_seeds_for_tost_meets_its_formula_and_bounds():
    n = stats.seeds_for_tost(sd_diff=0.01, margin=0.012)
    t = stats.student_t_ppf
    assert n >= 5
    assert n * 0.012 ** 2 >= (t(0.95, n - 1) + t(0.9, n - 1)) ** 2 * 0.01 ** 2
    assert (n - 1) * 0.012 ** 2 < (t(0.95, n - 2) + t(0.9, n - 2)) ** 2 * 0.01 ** 2
    assert stats.seeds_for_tost(0.001, 0.05) == 5  # floor
    assert stats.seeds_for_tost(1.0, 0.01, max_n=50) == 50  # cap
    assert stats.seeds_for_tost(0.01, 0.02, expected_diff=0.03) == 1000
    assert stats.seeds_for_tost(0.02, 0.02) > stats.seeds_for_tost(0.01, 0.02)


def test_seeds_for_tost_power_by_simulation():
    rng = np.random.default_rng(0)
    sd, margin = 1.0, 1.2
    n = stats.seeds_for_tost(sd, margin, power=0.8)
    hits = 0
    trials = 400
    for _ in range(trials):
        d = rng.normal(0.0, sd, n)
        hits += stats.paired_tost(d, np.zeros(n), -margin, margin).equivalent
    assert hits / trials >= 0.72  # the t approximation is close to exact at 80%


def test_tost_power_inverts_seeds_for_tost_and_matches_simulation():
    sd, margin = 1.0, 1.2
    n = stats.seeds_for_tost(sd, margin, power=0.8, min_n=2)
    assert stats.tost_power(sd, margin, n) >= 0.8 > stats.tost_power(sd, margin, n - 1)
    rng = np.random.default_rng(1)
    trials = 400
    hits = sum(stats.paired_tost(d, np.zeros(n), -margin, margin).equivalent
               for d in rng.normal(0.0, sd, (trials, n)))
    assert abs(hits / trials - stats.tost_power(sd, margin, n)) < 0.08
    # The issue-6 pilot: SD 0.0026 against a margin of 0.0337 at n = 5 is ~100%, not 80%.
    assert stats.tost_power(0.0026095, 0.0336645, 5) > 0.999
    assert stats.tost_power(0.0, 0.1, 3) == 1.0
    with pytest.raises(ValueError):
        stats.tost_power(1.0, 0.0, 5)
    with pytest.raises(ValueError):
        stats.tost_power(1.0, 1.0, 1)


def test_noninferiority_is_one_sided_and_dual_to_the_lower_bound():
    # Sleep data (Student 1908) as a generic paired sample: mean difference 1.58, se 0.389.
    a = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]
    b = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
    r = stats.paired_noninferiority(a, b, margin=-0.5)
    t = stats.paired_t_test(a, b)
    assert r.t == pytest.approx((t.mean_diff + 0.5) / t.se)
    assert r.p_value == pytest.approx(stats.student_t_sf(r.t, 9))
    assert r.lower_bound == pytest.approx(t.mean_diff - stats.student_t_ppf(0.95, 9) * t.se)
    assert r.non_inferior and r.lower_bound > -0.5
    # Being better never hurts (unlike a two-sided equivalence test) ...
    better = stats.paired_noninferiority([x + 10 for x in a], b, margin=-0.5)
    assert better.non_inferior and better.p_value < r.p_value
    # ... and the decision flips exactly where the lower bound crosses the margin.
    assert not stats.paired_noninferiority(a, b, margin=r.lower_bound + 1e-9).non_inferior
    assert stats.paired_noninferiority(a, b, margin=r.lower_bound - 1e-9).non_inferior
    assert stats.paired_noninferiority([0.0] * 3, [0.0] * 3, margin=-0.01).non_inferior
    with pytest.raises(ValueError):
        stats.paired_noninferiority(a, b, margin=-0.5, alpha=0.6)
