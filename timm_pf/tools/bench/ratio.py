"""The latency ratio of a model to its baseline, from rounds that ran both back to back, and whether
it is stable enough to quote.

Each round times the model and its baseline one after the other, so a round's ratio is what drift or
a burst of load on a shared machine affects least. With ``statistic='median'`` the ratio is the median
of these per-round ratios and its spread their quartiles; the median of per-model medians would mix
rounds and can fall outside the spread of the rounds themselves. With ``statistic='min'`` it is the
ratio of the fastest runs, and its spread that of the ratios of the k-th fastest runs over the fastest
quarter of the rounds (at least two): undisturbed runs agree there even on a busy machine.

A ratio is *unstable* when fewer than :data:`MIN_STABLE_ROUNDS` rounds ran or its spread is wider than
:data:`MAX_RELATIVE_SPREAD` of the ratio; the benchmark then keeps measuring up to its cap, and marks
what stays unstable in every report instead of passing or failing a target on it.
"""
import statistics
from dataclasses import dataclass
from typing import Sequence, Tuple

__all__ = ['MIN_STABLE_ROUNDS', 'MAX_RELATIVE_SPREAD', 'LatencyRatio', 'latency_ratio', 'quantiles']

MIN_STABLE_ROUNDS = 5
MAX_RELATIVE_SPREAD = 0.10


def quantiles(values: Sequence[float]) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile), inclusive method; one value is its own quartiles."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method='inclusive')
    return q1, median, q3


@dataclass(frozen=True)
class LatencyRatio:
    """A latency ratio, its spread [q1, q3] and why it is unstable ('' when it is stable)."""
    value: float
    q1: float
    q3: float
    unstable: str = ''


def latency_ratio(latencies: Sequence[float], base_latencies: Sequence[float],
                  statistic: str = 'median') -> LatencyRatio:
    """The ratio of ``latencies`` to ``base_latencies``, timed in the same rounds (same length, in order)."""
    if len(latencies) != len(base_latencies) or not latencies:
        raise ValueError('a paired ratio needs the same number (at least one) of model and baseline rounds')
    if statistic == 'median':
        q1, value, q3 = quantiles([a / b for a, b in zip(latencies, base_latencies)])
        spread_name = 'paired-ratio IQR'
    elif statistic == 'min':
        fastest = max(2, len(latencies) // 4)
        ordered = [a / b for a, b in zip(sorted(latencies), sorted(base_latencies))][:fastest]
        value, q1, q3 = ordered[0], min(ordered), max(ordered)
        spread_name = f'ratio over the {len(ordered)} fastest runs'
    else:
        raise ValueError(f'unknown statistic {statistic!r}; choose median or min')
    rounds = len(latencies)
    if rounds < MIN_STABLE_ROUNDS:
        reason = f'only {rounds} rounds ({MIN_STABLE_ROUNDS} needed): rerun with a larger --time-budget or --repeats'
    elif q3 - q1 > MAX_RELATIVE_SPREAD * value:
        other_statistic = ' or with --statistic min' if statistic == 'median' else ''
        reason = (f'{spread_name} {q1:.2f}-{q3:.2f} is wider than {MAX_RELATIVE_SPREAD:.0%} of the ratio: '
                  f'machine busy? rerun on an idle machine{other_statistic}')
    else:
        reason = ''
    return LatencyRatio(value, q1, q3, reason)
