"""The largest-N search of ``benchmarks/pair_weighted_averaging.py --fit`` (CPU: the
search alone, with a fake trial)."""

import pytest

from benchmark_scripts import load_benchmark


@pytest.mark.parametrize("limit", [128, 300, 1024, 1100, 2560, 5000, 8192, 20000])
@pytest.mark.parametrize("start", [128, 1024, 4096])
def test_largest_fitting_finds_the_limit_in_few_trials(limit, start):
    search = load_benchmark("pair_weighted_averaging").largest_fitting
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    lo, hi = search(fits, start, 128, 8192)
    assert lo == min(limit // 128 * 128, 8192)
    assert (hi is None) == (limit >= 8192) and (hi is None or hi == lo + 128)
    assert all(n % 128 == 0 and 128 <= n <= 8192 for n in tried) and len(tried) <= 14


def test_largest_fitting_when_nothing_fits():
    lo, hi = load_benchmark("pair_weighted_averaging").largest_fitting(lambda n: False, 1024, 128, 8192)
    assert (lo, hi) == (0, 128)


@pytest.mark.parametrize("start", [128, 896, 10000])
def test_largest_fitting_stops_at_a_cap_off_the_step(start):
    """A max_n that is no multiple of the step (and a start past it): the search ends at
    the largest multiple of the step within max_n."""
    tried = []
    lo, hi = load_benchmark("pair_weighted_averaging").largest_fitting(lambda n: tried.append(n) or True,
                                                                       start, 128, 1000)
    assert (lo, hi) == (896, None)
    assert max(tried) == 896 and len(tried) <= 5
