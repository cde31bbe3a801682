"""The code -> item index: build, save/load, and sparse top-k retrieval against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from sparcode_cli.data.dataset import Ragged
from sparcode_cli.errors import UserError
from sparcode_cli.retrieval.sparse_index import (
    CODES_FILE,
    INDEX_FILE,
    CodeIndex,
    CSRBuilder,
    TopK,
    build_csr_from_chunks,
    encode_scores,
    estimate_bytes,
    overlap_at_k,
    prune,
    retrieve,
    topk_dense,
)


def dyadic_table(rng: np.random.Generator, n_codes: int, n_items: int, density: float) -> np.ndarray:
    """Dense (n_codes, n_items + 1) float32 scores: multiples of 1/8 (sums are exact in any order, many ties),
    about `density` of them > 0, the rest <= 0; column 0 (padding) is also filled, and must be ignored."""
    pos = rng.random((n_codes, n_items + 1)) < density
    vals = rng.integers(1, 17, size=pos.shape) / 8.0
    return np.where(pos, vals, -rng.integers(0, 9, size=pos.shape) / 8.0).astype(np.float32)


def capped(table: np.ndarray, cap: int | None) -> np.ndarray:
    """The table the index stores, by brute force: > 0, no column 0, best `cap` per row (score desc, id asc)."""
    t = np.where(table > 0, table, 0).astype(np.float32)
    t[:, 0] = 0
    if cap is not None:
        for r in range(t.shape[0]):
            nz = np.flatnonzero(t[r])
            order = nz[np.lexsort((nz, -t[r, nz]))]
            t[r, order[cap:]] = 0
    return t


def build(table: np.ndarray, codes: np.ndarray, cap: int | None = None, chunk: int = 7) -> CodeIndex:
    b = CSRBuilder(table.shape[1] - 1, max_per_code=cap)
    for s in range(0, len(codes), chunk):
        b.add(codes[s : s + chunk], table[codes[s : s + chunk]])
    return b.finish()


def dense_scores(stored: np.ndarray, user_codes: np.ndarray) -> np.ndarray:
    """Brute force: each user's score row is the sum of its codes' stored rows (a repeat counts twice)."""
    return stored[user_codes].sum(axis=1)


def random_history(rng: np.random.Generator, n_users: int, n_items: int, max_len: int) -> Ragged:
    return Ragged.from_lists(
        [
            rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, max_len + 1), replace=False)
            for _ in range(n_users)
        ]
    )


def brute_topk(dense: np.ndarray, hist: Ragged | None, k: int) -> TopK:
    """The reference lists: topk_dense of dense scores with the index's rule (scores <= 0 not retrieved)."""
    return topk_dense(dense, hist, k, exclude_nonpositive=True)


def assert_same(a: TopK, b: TopK) -> None:
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_retrieve_equals_dense_topk(seed: int, k: int) -> None:
    rng = np.random.default_rng(seed)
    n_codes, n_items, n_users = 30, 120, 60
    table = dyadic_table(rng, n_codes, n_items, density=0.15)
    index = build(table, np.arange(n_codes))
    user_codes = rng.integers(0, n_codes, size=(n_users, 3))
    hist = random_history(rng, n_users, n_items, max_len=30)
    got = retrieve(index, user_codes, hist, k)
    want = brute_topk(dense_scores(capped(table, None), user_codes), hist, k)
    assert_same(got, want)
    assert got.n_on_the_fly_users == 0
    # one user per call (the single-query path) gives the same rows
    for u in range(0, n_users, 7):
        one = retrieve(index, user_codes[u : u + 1], Ragged.from_lists([hist.row(u)]), k)
        assert_same(one, TopK(want.items[u : u + 1], want.scores[u : u + 1], want.lengths[u : u + 1]))


def test_ties_break_by_smaller_item_id() -> None:
    # items 3, 5, 9 and 2 all score 1.0; item 7 scores 2.0
    table = np.zeros((1, 11), dtype=np.float32)
    table[0, [9, 3, 5, 2]] = 1.0
    table[0, 7] = 2.0
    index = build(table, np.array([0]))
    top = retrieve(index, np.array([[0]]), None, k=3)
    np.testing.assert_array_equal(top.items[0], [7, 2, 3])
    np.testing.assert_array_equal(top.scores[0], [2.0, 1.0, 1.0])
    top = retrieve(index, np.array([[0]]), Ragged.from_lists([[2]]), k=3)
    np.testing.assert_array_equal(top.items[0], [7, 3, 5])


def test_short_and_empty_rows_give_shorter_lists() -> None:
    table = np.zeros((3, 21), dtype=np.float32)
    table[0, [4, 6]] = [0.5, 0.25]  # two non-zeros
    table[2, 1:] = -1.0  # nothing positive: an empty row
    index = build(table, np.array([0, 1, 2]))
    top = retrieve(index, np.array([[0, 1], [1, 2], [0, 0]]), None, k=5)
    np.testing.assert_array_equal(top.lengths, [2, 0, 2])
    np.testing.assert_array_equal(top.items[0], [4, 6, 0, 0, 0])
    assert np.isneginf(top.scores[0, 2:]).all()
    assert (top.items[1] == 0).all() and np.isneginf(top.scores[1]).all()
    np.testing.assert_array_equal(top.scores[2, :2], [1.0, 0.5])  # code 0 twice: every score doubles


def test_history_is_masked_csr_or_ragged() -> None:
    rng = np.random.default_rng(5)
    table = dyadic_table(rng, 10, 50, density=0.5)
    index = build(table, np.arange(10))
    user_codes = rng.integers(0, 10, size=(20, 2))
    hist = random_history(rng, 20, 50, max_len=45)  # some users have most items masked
    a = retrieve(index, user_codes, hist, k=10)
    b = retrieve(index, user_codes, hist.to_csr(51), k=10)
    assert_same(a, b)
    for u in range(20):
        assert not set(a.row(u)[0]) & set(hist.row(u))
    assert_same(a, brute_topk(dense_scores(capped(table, None), user_codes), hist, 10))


def test_long_histories_beyond_the_bound_table() -> None:
    rng = np.random.default_rng(11)
    n_items = 5000
    table = dyadic_table(rng, 6, n_items, density=0.9)
    index = build(table, np.arange(6), chunk=6)
    user_codes = rng.integers(0, 6, size=(4, 2))
    hist = Ragged.from_lists([np.arange(1, 4500), np.arange(2, 200), [], np.arange(1, n_items + 1)])
    got = retrieve(index, user_codes, hist, k=7)
    assert_same(got, brute_topk(dense_scores(capped(table, None), user_codes), hist, 7))
    assert got.lengths[3] == 0


def test_repeated_codes_count_twice() -> None:
    table = np.zeros((2, 6), dtype=np.float32)
    table[0, 1] = 1.0
    table[1, 2] = 1.5
    index = build(table, np.array([0, 1]))
    top = retrieve(index, np.array([[0, 0, 1], [0, 1, 1]]), None, k=2)
    np.testing.assert_array_equal(top.items, [[1, 2], [2, 1]])
    np.testing.assert_array_equal(top.scores, [[2.0, 1.5], [3.0, 1.0]])


def test_codes_missing_from_the_index_are_scored_on_the_fly() -> None:
    rng = np.random.default_rng(3)
    n_universe, n_items = 40, 80
    table = dyadic_table(rng, n_universe, n_items, density=0.2)
    built = np.sort(rng.choice(n_universe, size=15, replace=False))
    index = build(table, built, cap=None)
    missing = np.setdiff1d(np.arange(n_universe), built)
    user_codes = np.concatenate(
        [
            rng.choice(built, size=(10, 3)),  # all built
            rng.choice(missing, size=(5, 3)),  # all missing
            np.stack([rng.choice(built, 6), rng.choice(missing, 6), rng.choice(built, 6)], axis=1),
        ]
    )
    calls: list[np.ndarray] = []

    def score_codes(codes: np.ndarray) -> np.ndarray:
        calls.append(codes.copy())
        return table[codes]  # raw model scores: negatives and column 0 included, the index rules apply

    hist = random_history(rng, len(user_codes), n_items, max_len=10)
    got = retrieve(index, user_codes, hist, 12, on_the_fly=score_codes)
    want = brute_topk(dense_scores(capped(table, None), user_codes), hist, 12)
    assert_same(got, want)
    assert got.n_on_the_fly_users == 11
    asked = np.concatenate(calls)
    assert set(asked) <= set(missing) and len(asked) == len(np.unique(asked))
    with pytest.raises(ValueError, match="on_the_fly"):
        retrieve(index, user_codes, hist, 12)


@pytest.mark.parametrize("cap", [1, 3, 10])
def test_max_per_code_equals_the_capped_dense_table(cap: int) -> None:
    rng = np.random.default_rng(cap)
    n_codes, n_items = 25, 60
    table = dyadic_table(rng, n_codes, n_items, density=0.4)
    stored = capped(table, cap)
    built = np.arange(0, n_codes, 2)
    index = build(table, built, cap=cap)
    np.testing.assert_array_equal(index.matrix.toarray(), stored[built])
    assert index.max_per_code == cap
    user_codes = rng.integers(0, n_codes, size=(30, 4))  # odd codes are missing: on the fly, capped the same
    hist = random_history(rng, 30, n_items, max_len=8)
    got = retrieve(index, user_codes, hist, 6, on_the_fly=lambda c: table[c])
    assert_same(got, brute_topk(dense_scores(stored, user_codes), hist, 6))


def test_chunked_build_equals_one_shot_and_any_chunk_order() -> None:
    rng = np.random.default_rng(8)
    table = dyadic_table(rng, 33, 70, density=0.3)
    codes = np.arange(100, 133)
    one = build_csr_from_chunks([(codes, table)], 70)
    assert one.matrix.indices.dtype == np.int32 and one.matrix.data.dtype == np.float32
    np.testing.assert_array_equal(one.code_ids, codes)
    np.testing.assert_array_equal(one.matrix.toarray(), capped(table, None))
    perm = rng.permutation(33)
    shuffled = build_csr_from_chunks(
        [(codes[perm[s : s + 5]], table[perm[s : s + 5]]) for s in range(0, 33, 5)], 70
    )
    np.testing.assert_array_equal(shuffled.code_ids, one.code_ids)
    assert (shuffled.matrix != one.matrix).nnz == 0
    assert shuffled.matrix.has_canonical_format
    assert one.nnz == int((capped(table, None) > 0).sum())
    assert one.density == pytest.approx(one.nnz / (33 * 70))
    m = one.matrix
    assert one.nbytes == m.data.nbytes + m.indices.nbytes + m.indptr.nbytes + one.code_ids.nbytes
    with pytest.raises(ValueError, match="twice"):
        build_csr_from_chunks([(codes[:3], table[:3]), (codes[2:4], table[2:4])], 70)


def test_compiled_append_equals_the_numpy_path() -> None:
    """A C-contiguous float32 chunk without a cap takes the compiled gather; a float64 or strided one the
    numpy mask: the same CSR. A non-finite kept score names its code either way."""
    rng = np.random.default_rng(9)
    table = dyadic_table(rng, 21, 90, density=0.2)
    table[4] = -1.0  # an empty row
    codes = np.arange(50, 71)
    fast = build_csr_from_chunks([(codes, table)], 90)
    for slow_table in (table.astype(np.float64), np.asfortranarray(table)):
        slow = build_csr_from_chunks([(codes, slow_table)], 90)
        assert (slow.matrix != fast.matrix).nnz == 0
        np.testing.assert_array_equal(slow.matrix.indptr, fast.matrix.indptr)
        np.testing.assert_array_equal(slow.matrix.indices, fast.matrix.indices)
    assert fast.matrix.getrow(4).nnz == 0
    np.testing.assert_array_equal(fast.matrix.toarray(), capped(table, None))
    for bad_table in (table.copy(), table.astype(np.float64)):
        bad_table[7, 3] = np.inf
        with pytest.raises(ValueError, match="non-finite score for code 57"):
            build_csr_from_chunks([(codes, bad_table)], 90)


def test_row_of() -> None:
    index = build(np.ones((4, 5), dtype=np.float32), np.array([0, 1, 2, 3]))
    index = CodeIndex(index.matrix, np.array([3, 10, 11, 40]))
    rows, found = index.row_of(np.array([[10, 4], [40, 3]]))
    np.testing.assert_array_equal(rows, [[1, -1], [3, 0]])
    np.testing.assert_array_equal(found, [[True, False], [True, True]])


def test_save_load_roundtrip(tmp_path) -> None:
    rng = np.random.default_rng(4)
    table = dyadic_table(rng, 40, 40, density=0.3)
    index = build(table, np.arange(0, 40, 2), cap=5)
    index.save(tmp_path)
    loaded = CodeIndex.load(tmp_path)
    np.testing.assert_array_equal(loaded.code_ids, index.code_ids)
    assert loaded.max_per_code == 5 and (loaded.matrix != index.matrix).nnz == 0
    user_codes = rng.choice(index.code_ids, size=(15, 3))
    hist = random_history(rng, 15, 40, 6)
    assert_same(retrieve(loaded, user_codes, hist, 8), retrieve(index, user_codes, hist, 8))
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_truncated_or_missing_index_is_a_user_error(tmp_path) -> None:
    index = build(np.ones((3, 9), dtype=np.float32), np.arange(3))
    index.save(tmp_path)
    raw = (tmp_path / INDEX_FILE).read_bytes()
    (tmp_path / INDEX_FILE).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(UserError, match="index.npz.*truncated or corrupt") as e:
        CodeIndex.load(tmp_path)
    assert "sparcode index" in str(e.value)
    (tmp_path / INDEX_FILE).write_bytes(b"not a zip file at all")
    with pytest.raises(UserError, match="index.npz"):
        CodeIndex.load(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(UserError, match="index.npz is missing"):
        CodeIndex.load(tmp_path)
    with pytest.raises(UserError, match="missing"):
        CodeIndex.load(tmp_path / "nowhere")


def test_index_and_codes_file_mismatch_is_a_user_error(tmp_path) -> None:
    build(np.ones((3, 9), dtype=np.float32), np.arange(3)).save(tmp_path / "a")
    build(np.ones((4, 9), dtype=np.float32), np.arange(4)).save(tmp_path / "b")
    (tmp_path / "a" / INDEX_FILE).write_bytes((tmp_path / "b" / INDEX_FILE).read_bytes())
    with pytest.raises(UserError, match="inconsistent"):
        CodeIndex.load(tmp_path / "a")


def test_prune_equals_a_build_with_the_shifted_scores() -> None:
    rng = np.random.default_rng(9)
    table = dyadic_table(rng, 12, 30, density=0.6)
    index = build(table, np.arange(12))
    got = prune(index, shift=0.5, max_per_code=4)
    want = build(table - np.float32(0.5), np.arange(12), cap=4)
    assert got.max_per_code == 4
    np.testing.assert_array_equal(got.matrix.toarray(), want.matrix.toarray())
    with pytest.raises(ValueError):
        prune(index, shift=-1.0)


def test_estimate_bytes() -> None:
    small = estimate_bytes(4096, 40981, 0.05)
    nnz = 4096 * 40981 * 0.05
    assert 2 * nnz * 8 <= small <= 2 * nnz * 8 + 4096 * 100
    assert estimate_bytes(4096, 40981, 0.05, max_per_code=100) < small
    assert estimate_bytes(10, 10, 0.5, chunk_rows=2) == estimate_bytes(10, 10, 0.5) + 2 * 11 * 4


def test_topk_dense_rules() -> None:
    scores = np.array(
        [[9.0, -1.0, 3.0, 3.0, 0.0, 2.0], [9.0, np.nan, -2.0, -2.0, -5.0, 0.0]], dtype=np.float32
    )
    hist = Ragged.from_lists([[5], []])
    top = topk_dense(scores, hist, 4, exclude_nonpositive=False)
    np.testing.assert_array_equal(top.items, [[2, 3, 4, 1], [5, 2, 3, 4]])  # column 0 never; NaN never
    top = topk_dense(scores, hist, 4, exclude_nonpositive=True)
    np.testing.assert_array_equal(top.lengths, [2, 0])
    np.testing.assert_array_equal(top.items[0], [2, 3, 0, 0])
    top = topk_dense(scores, None, 10, exclude_nonpositive=False)
    np.testing.assert_array_equal(top.lengths, [5, 4])


def test_overlap_at_k() -> None:
    def tk(rows: list[list[int]], k: int) -> TopK:
        t = TopK.empty(len(rows), k)
        for u, r in enumerate(rows):
            t.items[u, : len(r)] = r
            t.scores[u, : len(r)] = np.arange(len(r), 0, -1)
            t.lengths[u] = len(r)
        return t

    a = tk([[1, 2, 3], [4, 5], [], [7]], 3)
    assert overlap_at_k(a, a, 3) == 1.0
    b = tk([[3, 2, 9], [6], [], []], 3)
    np.testing.assert_allclose(overlap_at_k(a, b, 3, per_user=True), [2 / 3, 0.0, 1.0, 0.0])
    np.testing.assert_allclose(overlap_at_k(a, b, 1, per_user=True), [0.0, 0.0, 1.0, 0.0])
    assert overlap_at_k(a, b, 3) == pytest.approx((2 / 3 + 1) / 4)
    np.testing.assert_allclose(a.to_ragged().values, [1, 2, 3, 4, 5, 7])


def test_long_rows_with_many_ties() -> None:
    # rows of ~600 entries with 16 distinct values: most of the top-k heap's decisions are ties
    rng = np.random.default_rng(21)
    n_codes, n_items, n_users = 40, 2000, 50
    table = dyadic_table(rng, n_codes, n_items, density=0.3)
    index = build(table, np.arange(n_codes), chunk=16)
    user_codes = rng.integers(0, n_codes, size=(n_users, 4))
    hist = random_history(rng, n_users, n_items, max_len=60)
    stored = capped(table, None)
    for k in (1, 20, 3000):
        got = retrieve(index, user_codes, hist, k)
        assert_same(got, brute_topk(dense_scores(stored, user_codes), hist, k))


# --------------------------------------------------------------------------------------- the serving kernel
def summed_like_score_all(stored: np.ndarray, user_codes: np.ndarray) -> np.ndarray:
    """SparCode.score_all's float32 sums in numpy: from 0, each distinct code in ascending id order adds
    count x its row (a product rounded, then a sum rounded)."""
    srt = np.sort(user_codes, axis=1)
    out = np.zeros((len(srt), stored.shape[1]), dtype=np.float32)
    for p in range(srt.shape[1]):
        col = srt[:, p]
        first = np.ones(len(col), dtype=bool) if p == 0 else col != srt[:, p - 1]
        count = (srt == col[:, None]).sum(axis=1).astype(np.float32)
        out += np.where(first[:, None], count[:, None] * stored[col], np.float32(0))
    return out


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, Ragged, int]:
    """A random table (continuous scores, a few tied ones, some empty rows), the built codes (most of them),
    user codes with repeats, and histories up to nearly every item; k from 1 to past the candidate count."""
    rng = np.random.default_rng(seed)
    n_codes, n_items = int(rng.integers(1, 25)), int(rng.integers(1, 150))
    density = float(rng.choice([0.02, 0.1, 0.4, 0.9]))
    table = (rng.standard_normal((n_codes, n_items + 1)) + _quantile(density)).astype(np.float32)
    table[rng.random(table.shape) < 0.1] = 0.75  # ties
    table[rng.random(n_codes) < 0.2] = -1.0  # empty rows
    built = np.flatnonzero(rng.random(n_codes) < 0.8)
    n_users, k_u = int(rng.integers(1, 40)), int(rng.integers(1, 7))
    user_codes = rng.integers(0, n_codes, size=(n_users, k_u))
    # repeated codes (count 2 or 3): added once, as count x row, at the code's place in ascending order
    rep = rng.random(n_users) < 0.3
    user_codes[rep, -1] = user_codes[rep, 0]
    if k_u > 2:
        user_codes[rep, -2] = user_codes[rep, 0]
    max_len = int(rng.choice([0, 5, n_items]))
    hist = random_history(rng, n_users, n_items, max_len=max_len)
    k = int(rng.choice([1, 3, 17, 500]))
    return table, built, user_codes, hist, k


def _quantile(density: float) -> float:
    from statistics import NormalDist

    return -NormalDist().inv_cdf(1.0 - density)


@pytest.mark.parametrize("seed", range(40))
def test_kernel_equals_dense_topk_bit_for_bit(seed: int) -> None:
    table, built, user_codes, hist, k = random_case(seed)
    index = build(table, built)
    got = retrieve(index, user_codes, hist, k, on_the_fly=lambda c: table[c])
    dense = summed_like_score_all(capped(table, None), user_codes)
    assert_same(got, brute_topk(dense, hist, k))
    assert got.n_on_the_fly_users == int((~np.isin(user_codes, built)).any(axis=1).sum())


def test_scores_follow_ascending_code_order() -> None:
    """Continuous scores: another summation order changes last bits, so equality here pins the order."""
    rng = np.random.default_rng(7)
    table = rng.random((6, 400)).astype(np.float32) * np.float32(1e3) + np.float32(1e-3)
    table[:, 0] = 0
    index = build(table, np.arange(6))
    user_codes = np.array([[5, 2, 4, 2], [3, 1, 0, 1], [4, 4, 4, 0]])
    got = retrieve(index, user_codes, None, k=399)
    want = summed_like_score_all(table, user_codes)
    other = table[user_codes].sum(axis=1, dtype=np.float32)  # the given order, a repeat added twice
    assert not np.array_equal(want[:, 1:], other[:, 1:])
    assert_same(got, brute_topk(want, None, 399))


def test_history_masking_in_the_kernel() -> None:
    table = np.zeros((2, 9), dtype=np.float32)
    table[0, [1, 2, 3, 4]] = [4.0, 3.0, 2.0, 1.0]
    table[1, [4, 5]] = [0.5, 0.5]
    index = build(table, np.array([0, 1]))
    # unsorted and repeated ids, item 0 and items no code reaches are harmless
    hist = Ragged.from_lists([[3, 1, 3, 0, 8], [], [1, 2, 3, 4, 5]])
    top = retrieve(index, np.array([[0, 1], [0, 1], [0, 1]]), hist, k=4)
    np.testing.assert_array_equal(top.items, [[2, 4, 5, 0], [1, 2, 3, 4], [0, 0, 0, 0]])
    np.testing.assert_array_equal(top.scores[0, :3], [3.0, 1.5, 0.5])
    np.testing.assert_array_equal(top.lengths, [3, 4, 0])
    assert_same(top, retrieve(index, np.array([[0, 1]] * 3), hist.to_csr(9), k=4))
    with pytest.raises(ValueError, match="history item ids"):
        retrieve(index, np.array([[0, 1]]), Ragged.from_lists([[9]]), k=4)


def test_kernel_threads_give_identical_lists_and_leave_torch_alone() -> None:
    """Same lists at 1 and 2 numba threads (the kernel follows torch's count); numba's "omp" layer once reset
    the caller's OpenMP count, so torch must keep the count it was set to."""
    import numba
    import torch

    rng = np.random.default_rng(13)
    table = dyadic_table(rng, 30, 500, density=0.2)
    index = build(table, np.arange(30))
    user_codes = rng.integers(0, 30, size=(101, 4))
    hist = random_history(rng, 101, 500, max_len=40)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = retrieve(index, user_codes, hist, 25)
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
        if numba.config.NUMBA_NUM_THREADS >= 2:
            torch.set_num_threads(2)
            two = retrieve(index, user_codes, hist, 25)
            assert torch.get_num_threads() == 2 and numba.get_num_threads() == 2
            assert_same(one, two)
    finally:
        torch.set_num_threads(prev)
    assert_same(one, brute_topk(dense_scores(capped(table, None), user_codes), hist, 25))


def test_depth_table_holds_each_rows_ranked_scores() -> None:
    import sparcode_cli.retrieval.sparse_index as si

    rng = np.random.default_rng(17)
    n_items = 1500
    table = dyadic_table(rng, 5, n_items, density=0.9)
    table[1, 20:] = -1.0  # 19 entries: shorter than every depth
    table[2] = -1.0  # empty
    index = build(table, np.arange(5))
    got = index._depths(np.array([3, 0, 3, 1, 2, 4]))
    for r in range(5):
        desc = np.sort(index.matrix[r].data)[::-1]
        want = [desc[d - 1] if d <= len(desc) else 0 for d in si._DEPTHS]
        np.testing.assert_array_equal(got[r], want)


@pytest.mark.parametrize("scores", ["dyadic", "continuous"])
def test_floor_is_exact_with_ties_repeats_and_histories_on_the_best_items(scores: str) -> None:
    """Rows long enough for every depth level: the kernel ranks only entries at or above a per-user floor.
    Ties sit at the floor (dyadic), codes repeat (count x the row's depth score), and histories cover the
    users' best items, up to past the deepest level (no floor then)."""
    rng = np.random.default_rng(23)
    n_codes, n_items, n_users = 12, 3000, 40
    if scores == "dyadic":
        table = dyadic_table(rng, n_codes, n_items, density=0.5)
    else:
        table = (rng.standard_normal((n_codes, n_items + 1)) + 0.2).astype(np.float32)
    index = build(table, np.arange(n_codes))
    user_codes = rng.integers(0, n_codes, size=(n_users, 4))
    user_codes[::3, 1] = user_codes[::3, 0]  # repeated codes
    dense = summed_like_score_all(capped(table, None), user_codes)
    lengths = [0, 5, 40, 300, 1100]  # 1100 + k is past the deepest level
    rows = []
    for u in range(n_users):
        best = np.argsort(-dense[u], kind="stable")
        rows.append(best[: lengths[u % len(lengths)]] if u % 2 else rng.permutation(best[:2000])[:80])
    hist = Ragged.from_lists(rows)
    for k in (1, 10, 50):
        got = retrieve(index, user_codes, hist, k)
        assert_same(got, brute_topk(dense, hist, k))


def test_ties_at_the_floor_are_kept() -> None:
    # 200 items tie at 0.5, so a row's 32nd-best score, the floor of a k=10 query, is 0.5 itself
    table = np.zeros((2, 301), dtype=np.float32)
    table[0, 101:301] = 0.5
    table[0, [7, 3]] = [2.0, 1.0]
    table[1, 1:301] = 0.25
    index = build(table, np.array([0, 1]))
    top = retrieve(index, np.array([[0], [0]]), Ragged.from_lists([[], [101, 3]]), k=10)
    np.testing.assert_array_equal(top.items[0], [7, 3, *range(101, 109)])
    np.testing.assert_array_equal(top.items[1], [7, *range(102, 111)])
    top = retrieve(index, np.array([[1, 1]]), None, k=10)  # count x the 32nd best: 2 x 0.25, every item
    np.testing.assert_array_equal(top.items[0], range(1, 11))
    np.testing.assert_array_equal(top.scores[0], np.full(10, 0.5, dtype=np.float32))


# ------------------------------------------------------------------------------------------ compact scores
def dequantized_table(table: np.ndarray, encoding: str) -> np.ndarray:
    """Every code's stored row as the kernel adds it: the full table built, encoded and decoded."""
    full = encode_scores(build(table, np.arange(table.shape[0])), encoding)
    out = np.zeros(table.shape, dtype=np.float32)
    out[full.code_ids] = full.dequantized().toarray()
    return out


@pytest.mark.parametrize("encoding", ["float16", "uint8"])
@pytest.mark.parametrize("seed", range(12))
def test_compact_scores_equal_dense_topk_of_the_dequantized_scores(encoding: str, seed: int) -> None:
    """Same kernel contract on the decoded values: index rows and on-the-fly rows (encoded alike), repeats,
    histories masked, ties (score desc, item asc), bit for bit."""
    table, built, user_codes, hist, k = random_case(seed)
    index = encode_scores(build(table, built), encoding)
    assert index.encoding == encoding and index.matrix.dtype == np.dtype(encoding)
    got = retrieve(index, user_codes, hist, k, on_the_fly=lambda c: table[c])
    dense = summed_like_score_all(dequantized_table(table, encoding), user_codes)
    assert_same(got, brute_topk(dense, hist, k))
    for u in range(len(user_codes)):
        assert not set(got.row(u)[0].tolist()) & set(hist.row(u).tolist())


def test_float32_encoding_is_the_index_itself() -> None:
    table = dyadic_table(np.random.default_rng(3), 6, 30, density=0.5)
    index = build(table, np.arange(6))
    assert index.encoding == "float32" and index.row_scale is None
    assert encode_scores(index, "float32") is index and index.dequantized() is index.matrix
    with pytest.raises(ValueError, match="encoding"):
        encode_scores(index, "int4")


def test_uint8_never_drops_an_entry_and_scales_per_row() -> None:
    table = np.full((3, 12), -1.0, dtype=np.float32)
    table[0, 1:] = np.float32(1e-6)  # far below max / 255 of its row ...
    table[0, 5] = np.float32(1000.0)  # ... which this sets
    table[1, 3] = np.float32(2.5)  # a single entry: q = 255
    index = build(table, np.arange(3))
    q = encode_scores(index, "uint8")
    np.testing.assert_array_equal(q.matrix.indices, index.matrix.indices)
    np.testing.assert_array_equal(q.matrix.indptr, index.matrix.indptr)
    assert q.matrix.data.min() >= 1 and q.matrix.data.max() == 255
    np.testing.assert_allclose(q.row_scale[:2], [1000.0 / 255, 2.5 / 255], rtol=1e-6)
    assert q.row_scale[2] > 0  # an empty row still has a valid scale
    deq = q.dequantized().toarray()
    assert deq[1, 3] == np.float32(255) * q.row_scale[1]
    assert (deq[table > 0] > 0).all()
    top = retrieve(q, np.array([[0]]), None, 20)
    assert top.lengths[0] == 11  # every stored item is still retrieved
    np.testing.assert_allclose(deq[0, 1:], np.where(np.arange(1, 12) == 5, 1000.0, 1000.0 / 255), rtol=1e-5)


def test_float16_keeps_tiny_scores_and_refuses_too_large_ones() -> None:
    table = np.full((2, 6), -1.0, dtype=np.float32)
    table[0, 1:] = [1e-12, 0.1, 1.0, 3.0, 60000.0]
    f = encode_scores(build(table, np.arange(2)), "float16")
    assert f.matrix.data.dtype == np.float16 and (f.matrix.data > 0).all()
    np.testing.assert_array_equal(f.dequantized().data, f.matrix.data.astype(np.float32))
    assert retrieve(f, np.array([[0]]), None, 10).lengths[0] == 5
    table[1, 1] = 70000.0
    with pytest.raises(ValueError, match="float16"):
        encode_scores(build(table, np.arange(2)), "float16")


@pytest.mark.parametrize("encoding", ["float16", "uint8"])
def test_compact_depth_table_holds_dequantized_scores(encoding: str) -> None:
    import sparcode_cli.retrieval.sparse_index as si

    rng = np.random.default_rng(5)
    table = (rng.random((4, 1200)) - 0.1).astype(np.float32)
    index = encode_scores(build(table, np.arange(4)), encoding)
    got = index._depths(np.arange(4))
    deq = index.dequantized()
    for r in range(4):
        desc = np.sort(deq[r].data)[::-1]
        np.testing.assert_array_equal(got[r], [desc[d - 1] if d <= len(desc) else 0 for d in si._DEPTHS])


@pytest.mark.parametrize("encoding", ["float32", "float16", "uint8"])
def test_compact_save_load_roundtrip(tmp_path, encoding: str) -> None:
    rng = np.random.default_rng(8)
    table = (rng.random((20, 50)) - 0.4).astype(np.float32)
    index = encode_scores(build(table, np.arange(0, 20, 2), cap=9), encoding)
    index.save(tmp_path)
    loaded = CodeIndex.load(tmp_path)
    assert loaded.encoding == encoding and loaded.max_per_code == 9
    assert loaded.matrix.dtype == index.matrix.dtype and (loaded.matrix != index.matrix).nnz == 0
    if encoding == "uint8":
        np.testing.assert_array_equal(loaded.row_scale, index.row_scale)
    assert loaded.nbytes == index.nbytes
    user_codes = rng.choice(index.code_ids, size=(12, 3))
    hist = random_history(rng, 12, 49, 5)
    assert_same(retrieve(loaded, user_codes, hist, 10), retrieve(index, user_codes, hist, 10))


def test_artifacts_without_an_encoding_load_as_float32(tmp_path) -> None:
    index = build(dyadic_table(np.random.default_rng(2), 5, 20, density=0.5), np.arange(5))
    index.save(tmp_path)
    with np.load(tmp_path / CODES_FILE) as z:
        old = {key: z[key] for key in z.files if key not in ("encoding", "row_scale")}
    np.savez(tmp_path / CODES_FILE, **old)  # what earlier versions wrote
    loaded = CodeIndex.load(tmp_path)
    assert loaded.encoding == "float32" and loaded.row_scale is None
    assert (loaded.matrix != index.matrix).nnz == 0


def test_compact_index_is_checked_on_load(tmp_path) -> None:
    q = encode_scores(build(np.ones((3, 9), dtype=np.float32), np.arange(3)), "uint8")
    q.save(tmp_path)
    with np.load(tmp_path / CODES_FILE) as z:
        old = {key: z[key] for key in z.files}
    np.savez(tmp_path / CODES_FILE, **{**old, "encoding": np.array("float32")})  # uint8 data, says float32
    with pytest.raises(UserError, match="inconsistent"):
        CodeIndex.load(tmp_path)
    np.savez(tmp_path / CODES_FILE, **{key: v for key, v in old.items() if key != "row_scale"})
    with pytest.raises(UserError, match="row_scale"):
        CodeIndex.load(tmp_path)
    np.savez(tmp_path / CODES_FILE, **{**old, "encoding": np.array("int4")})
    with pytest.raises(UserError, match="int4"):
        CodeIndex.load(tmp_path)
    with pytest.raises(ValueError, match="float32 index"):
        prune(q, 0.1)
