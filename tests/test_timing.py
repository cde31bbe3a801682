"""The one timing helper (median of repeats) and what the benchmarks build on it (bench/benchlib.py, the
operating-points figure)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from sparcode_cli import timing
from sparcode_cli.retrieval.sparse_index import CodeIndex


class _Clock:
    """perf_counter that advances by the given durations, one per call of the timed function."""

    def __init__(self, durations: list[float]) -> None:
        self.durations, self.now, self.calls = list(durations), 0.0, 0

    def perf_counter(self) -> float:
        return self.now

    def tick(self) -> None:
        self.now += self.durations[self.calls]
        self.calls += 1


def test_median_time_is_the_median_of_the_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = _Clock([5.0, 1.0, 3.0, 100.0])
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    assert timing.median_time(clock.tick) == 3.0  # not the best (1.0), not the first (5.0)
    assert clock.calls == timing.REPEATS >= 3
    with pytest.raises(ValueError):
        timing.median_time(clock.tick, 0)


def test_latency_is_the_median_over_rounds_of_each_rounds_percentiles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 3 rounds of 2 calls: per-round p50 = 2, 20, 4 -> the median 4
    clock = _Clock([1.0, 3.0, 10.0, 30.0, 2.0, 6.0])
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    p50, p99 = timing.latency_ms([clock.tick, clock.tick], rounds=3)
    assert clock.calls == 6
    assert p50 == pytest.approx(4000.0) and p99 == pytest.approx(np.percentile([2.0, 6.0], 99) * 1e3)
    assert timing.latency_ms([]) == (None, None)


@pytest.fixture
def benchlib():  # noqa: ANN201
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import benchlib

        yield benchlib
    finally:
        sys.path.pop(0)


def test_query_bytes_counts_each_distinct_codes_list_once_and_the_history(benchlib) -> None:  # noqa: ANN001
    rows = [[1, 2, 3], [4], [1, 5, 6, 7, 8]]  # row r: code id 10 * (r + 1); lengths 3, 1, 5
    m = sp.csr_matrix(
        (np.ones(9, dtype=np.float32), np.concatenate(rows), np.cumsum([0, 3, 1, 5])), shape=(3, 9)
    )
    index = CodeIndex(m, np.array([10, 20, 30]))
    codes = np.array(
        [[30, 10, 10], [20, 99, 20]]
    )  # user 0: rows 2 and 0 (10 twice); user 1: row 1, 99 absent
    out = benchlib.query_bytes(index, codes, np.array([4, 0]))
    per_row = 2 * m.indptr.itemsize + 11 * 4
    want = [(5 + 3) * 8 + 2 * per_row + 4 * 8, 1 * 8 + per_row]
    assert out["entry_bytes"] == 8 and out["entries_per_query"] == pytest.approx((8 + 1) / 2)
    assert out["bytes_per_query"] == pytest.approx(np.mean(want))
    assert out["users_all_rows"] == 1 and out["users"] == 2


def test_read_bandwidth_reads_the_whole_array(benchlib) -> None:  # noqa: ANN001
    x = np.arange(1000, dtype=np.float32)
    assert benchlib._stream_sum(x, 7) == pytest.approx(float(x.sum()))
    bw = benchlib.read_bandwidth(mib=1)
    assert bw["bytes_per_s"] > 0 and bw["repeats"] == timing.REPEATS


def test_operating_points_figure(tmp_path: Path) -> None:
    from sparcode_cli.reproduce import plots

    sparse = [
        {"qps_1t": 10.0, "recall@50": 0.2, "label": "reached"},
        {"qps_1t": 20.0, "recall@50": 0.1, "label": "cap"},
    ]
    hnsw = [{"qps_1t": q, "recall@50": r, "ef_search": e, "hnsw_m": m} for q, r, e, m in
            [(5.0, 0.3, 16, 32), (4.0, 0.31, 64, 32), (8.0, 0.15, 16, 4)]]  # fmt: skip
    png = plots.operating_points(sparse, hnsw, [{"qps_1t": 3.0, "recall@50": 0.32}], tmp_path / "op.png", "t",
                                 sparse_order="recall@50")  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
