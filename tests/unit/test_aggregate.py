import math

import pytest

from aggregator.state.fleet_stats import hit_rate_percent, load_mean_std


def test_population_standard_deviation_divides_by_n():
    mean, std = load_mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert mean == 5.0
    assert std == 2.0  # the sample std (n-1) would be 2.138...


def test_single_worker_has_zero_spread():
    assert load_mean_std([40]) == (40.0, 0.0)


def test_zero_workers_give_nothing_rather_than_nan():
    assert load_mean_std([]) is None


def test_large_equal_values_have_no_rounding_spread():
    mean, std = load_mean_std([1e12 + 1] * 1000)
    assert mean == 1e12 + 1
    assert std == 0.0


@pytest.mark.parametrize("overlap,isl,expected", [(8, 12, 100 * 8 / 12), (0, 10, 0.0), (10, 10, 100.0)])
def test_hit_rate_percent(overlap, isl, expected):
    assert math.isclose(hit_rate_percent(overlap, isl), expected)


def test_hit_rate_before_any_block_is_none():
    assert hit_rate_percent(0, 0) is None
