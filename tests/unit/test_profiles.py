"""Decreased Throughput Selection: best (b·p)/(l·m) among configurations that meet the SLO."""

from __future__ import annotations

import pytest

from gpufaas.scheduler.profiles import ProfilePoint, batch_sizes, choose_config
from gpufaas.shared.errors import InvalidArgument

pytestmark = pytest.mark.unit

MIB = 2**20


def point(batch: int, concurrency: int, latency_ms: float, memory_mib: float) -> ProfilePoint:
    return ProfilePoint(batch, concurrency, latency_ms / 1e3, int(memory_mib * MIB))


# Scores in requests per second per MiB (memory + the 1 MiB floor):
#   1 x 1: 100 / 11 = 9.1     8 x 1: 500 / 41 = 12.2 (best)
#   8 x 2: 533 / 81 = 6.6    16 x 1: 533 / 61 = 8.7
TABLE = [
    point(1, 1, 10.0, 10),
    point(8, 1, 16.0, 40),
    point(8, 2, 30.0, 80),
    point(16, 1, 30.0, 60),
]


def test_the_best_throughput_per_latency_and_memory_wins() -> None:
    choice = choose_config(TABLE, None, max_batch=32)
    assert (choice.batch, choice.concurrency) == (8, 1)
    assert choice.throughput_rps == pytest.approx(500.0)
    assert choice.score == pytest.approx(500.0 / (41 * MIB))
    assert choice.latency_s == pytest.approx(0.016)
    assert choice.memory_bytes == 40 * MIB
    assert "batch 8 x 1" in choice.reason
    assert "4 of 4" in choice.reason


def test_the_slo_counts_the_batch_forming_wait_as_one_more_batch() -> None:
    # 8 x 1 takes 16 ms, 32 ms in the worst case: over a 30 ms SLO, so 1 x 1 (20 ms) wins.
    choice = choose_config(TABLE, 0.030, max_batch=32)
    assert (choice.batch, choice.concurrency) == (1, 1)
    assert "slo_ms=30" in choice.reason
    # Exactly twice the latency still meets it.
    assert choose_config(TABLE, 0.032, max_batch=32).batch == 8


def test_max_batch_leaves_out_larger_batches() -> None:
    assert choose_config(TABLE, None, max_batch=4).batch == 1
    assert choose_config(TABLE, None, max_batch=8).batch == 8
    with pytest.raises(InvalidArgument) as info:
        choose_config(TABLE[1:], None, max_batch=4)
    assert info.value.field == "options.max_batch_size"
    assert "smallest profiled batch is 8" in info.value.message


def test_within_five_percent_of_the_best_the_least_memory_wins() -> None:
    big = point(4, 1, 10.0, 39)  # 400 / 40 = 10.0: the best score
    lean = point(2, 1, 10.2, 19)  # 196 / 20 = 9.8: within 5%, half the memory
    leaner = point(1, 1, 20.0, 9)  # 50 / 10 = 5.0: far from the best, however small
    choice = choose_config([big, lean, leaner], None, max_batch=32)
    assert (choice.batch, choice.memory_bytes) == (2, 19 * MIB)
    assert "least memory of 2 within 5%" in choice.reason


def test_with_equal_memory_the_highest_throughput_wins() -> None:
    one = point(4, 1, 10.0, 15)  # 400 req/s
    two = point(2, 2, 10.2, 15)  # 392 req/s, within 5%
    assert (choose_config([two, one], None, max_batch=32).concurrency) == 1


def test_zero_memory_does_not_divide_by_zero() -> None:
    choice = choose_config([point(1, 1, 5.0, 0), point(2, 1, 6.0, 0)], None, max_batch=8)
    assert choice.batch == 2
    assert choice.score == pytest.approx(333.333 / MIB, rel=1e-4)


def test_no_configuration_meets_the_slo_names_the_field_and_the_fastest() -> None:
    points = [point(1, 1, 12.3, 5), point(4, 1, 20.0, 10), point(64, 1, 1.0, 10)]
    with pytest.raises(InvalidArgument) as info:
        choose_config(points, 0.005, max_batch=32)  # batch 64 would fit, but is too large
    assert info.value.field == "options.slo_ms"
    assert info.value.code == "invalid_argument"
    assert info.value.message == (
        "no configuration meets slo_ms=5: the fastest, batch 1 x 1, takes 12.3 ms per batch "
        "(24.6 ms worst case)"
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="no profile points"):
        choose_config([], 0.1, max_batch=8)
    with pytest.raises(ValueError, match="max_batch"):
        choose_config(TABLE, 0.1, max_batch=0)
    with pytest.raises(InvalidArgument) as info:
        choose_config(TABLE, 0.0, max_batch=8)
    assert info.value.field == "options.slo_ms"
    with pytest.raises(ValueError, match="latency_s"):
        point(1, 1, 0.0, 1)
    with pytest.raises(ValueError, match="batch and concurrency"):
        point(0, 1, 1.0, 1)


def test_batch_sizes_are_powers_of_two_and_the_maximum() -> None:
    assert batch_sizes(1) == [1]
    assert batch_sizes(8) == [1, 2, 4, 8]
    assert batch_sizes(12) == [1, 2, 4, 8, 12]
    assert batch_sizes(33) == [1, 2, 4, 8, 16, 32, 33]
    with pytest.raises(ValueError, match="max_batch"):
        batch_sizes(0)


def test_counting_the_weights_lets_throughput_win_over_a_few_mib_of_activations() -> None:
    mib = 2**20
    points = [
        ProfilePoint(batch=4, concurrency=1, latency_s=0.0192, memory_bytes=1 * mib),
        ProfilePoint(batch=32, concurrency=1, latency_s=0.094, memory_bytes=9 * mib),
    ]
    assert choose_config(points, None, max_batch=32).batch == 4  # activations alone
    assert choose_config(points, None, max_batch=32, weights_bytes=87 * mib).batch == 32
