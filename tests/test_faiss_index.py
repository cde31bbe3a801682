"""Faiss indexes over item vectors: exact flat search with masking and the tie rule; ANN overlap; files."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from sparcode_cli.data.dataset import Ragged
from sparcode_cli.errors import UserError
from sparcode_cli.retrieval.faiss_index import (
    build_faiss_index,
    get_threads,
    load_faiss_index,
    save_faiss_index,
    search,
    threads,
)
from sparcode_cli.retrieval.sparse_index import overlap_at_k, topk_dense


def brute_force(items: np.ndarray, queries: np.ndarray, hist: Ragged | None, k: int):
    scores = queries.astype(np.float64) @ items.astype(np.float64).T
    return topk_dense(scores, hist, k, exclude_nonpositive=False)


def random_history(rng: np.random.Generator, n_users: int, n_items: int, max_len: int) -> Ragged:
    return Ragged.from_lists(
        [
            rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, max_len + 1), replace=False)
            for _ in range(n_users)
        ]
    )


@pytest.mark.parametrize("k", [1, 10, 50])
def test_flat_equals_brute_force_with_masking_and_ties(k: int) -> None:
    # small integer vectors: inner products are exact integers with many ties, also at the search cut-off
    rng = np.random.default_rng(k)
    n_items, d, n_q = 300, 6, 70
    items = rng.integers(-2, 3, size=(n_items + 1, d)).astype(np.float32)
    items[0] = 100.0  # padding row: would win every query if it were indexed
    queries = rng.integers(-2, 3, size=(n_q, d)).astype(np.float32)
    hist = random_history(rng, n_q, n_items, max_len=40)
    index = build_faiss_index(items, "flat")
    assert index.ntotal == n_items
    got = search(index, queries, hist, k, batch_size=16)
    want = brute_force(items, queries, hist, k)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.scores, want.scores)
    for u in range(n_q):
        assert not set(got.row(u)[0]) & set(hist.row(u))


def test_flat_ties_cut_by_the_search_depth_are_searched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # only 3 distinct item vectors: ~100 items tie at every score, far past k + history
    import sparcode_cli.retrieval.faiss_index as fi

    rng = np.random.default_rng(0)
    base = np.array([[1, 0], [0, 1], [1, 1]], dtype=np.float32)
    items = np.concatenate([np.zeros((1, 2), np.float32), base[rng.integers(0, 3, 300)]])
    queries = rng.integers(1, 3, size=(20, 2)).astype(np.float32)
    hist = random_history(rng, 20, 300, max_len=5)
    depths: list[int] = []
    real = fi._search_raw
    monkeypatch.setattr(fi, "_search_raw", lambda index, q, ks: depths.append(ks) or real(index, q, ks))
    got = search(build_faiss_index(items, "flat"), queries, hist, 7)
    want = brute_force(items, queries, hist, 7)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.scores, want.scores)
    assert max(depths) > 7 + 5 + 1  # some rows needed a deeper search


def test_flat_short_lists_when_history_covers_the_catalogue() -> None:
    rng = np.random.default_rng(0)
    items = rng.standard_normal((11, 4)).astype(np.float32)
    hist = Ragged.from_lists([np.arange(1, 9), []])
    got = search(build_faiss_index(items, "flat"), rng.standard_normal((2, 4)).astype(np.float32), hist, 5)
    np.testing.assert_array_equal(got.lengths, [2, 5])
    assert set(got.row(0)[0]) == {9, 10} and got.items[0, 2:].tolist() == [0, 0, 0]


def test_item_subset_keeps_the_id_mapping() -> None:
    rng = np.random.default_rng(1)
    items = rng.standard_normal((50, 8)).astype(np.float32)
    keep = np.array([3, 17, 18, 40])
    for kind in ("flat", "hnsw", "ivf"):
        index = build_faiss_index(items, kind, items=keep, nlist=2)
        got = search(index, rng.standard_normal((5, 8)).astype(np.float32), None, 4)
        assert set(got.items.ravel()) <= set(keep)


def clustered(rng: np.random.Generator, n: int, d: int, n_clusters: int = 20) -> np.ndarray:
    centers = rng.standard_normal((n_clusters, d)) * 3
    x = centers[rng.integers(0, n_clusters, n)] + rng.standard_normal((n, d)) * 0.5
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)  # unit norm: IP = cosine


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_overlaps_flat_on_easy_data(kind: str) -> None:
    rng = np.random.default_rng(2)
    items = clustered(rng, 3001, 16)
    queries = clustered(rng, 200, 16)
    hist = random_history(rng, 200, 3000, max_len=20)
    exact = search(build_faiss_index(items, "flat"), queries, hist, 20)
    approx = search(build_faiss_index(items, kind, nlist=32, nprobe=8, seed=0), queries, hist, 20)
    assert overlap_at_k(approx, exact, 20) >= 0.9
    # the re-sort keeps every list in (score desc, item asc) order
    for u in range(200):
        it, sc = approx.row(u)
        assert all(
            (sc[i] > sc[i + 1]) or (sc[i] == sc[i + 1] and it[i] < it[i + 1]) for i in range(len(it) - 1)
        )


def test_ivf_training_is_seeded() -> None:
    rng = np.random.default_rng(3)
    items = clustered(rng, 1001, 8)
    queries = clustered(rng, 50, 8)
    a = search(build_faiss_index(items, "ivf", nlist=16, nprobe=2, seed=7), queries, None, 10)
    b = search(build_faiss_index(items, "ivf", nlist=16, nprobe=2, seed=7), queries, None, 10)
    np.testing.assert_array_equal(a.items, b.items)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_save_load_roundtrip(tmp_path, kind: str) -> None:
    rng = np.random.default_rng(4)
    items = clustered(rng, 501, 8)
    queries = clustered(rng, 30, 8)
    index = build_faiss_index(items, kind, nlist=8, ef_search=40)
    path = tmp_path / "index.faiss"
    save_faiss_index(index, path)
    loaded = load_faiss_index(path)
    hist = random_history(rng, 30, 500, 10)
    a, b = search(index, queries, hist, 10), search(loaded, queries, hist, 10)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)
    if kind == "hnsw":  # a deep search must not leave efSearch changed
        assert faiss.downcast_index(loaded.index).hnsw.efSearch == 40


def test_truncated_or_missing_faiss_file_is_a_user_error(tmp_path) -> None:
    items = np.random.default_rng(5).standard_normal((200, 8)).astype(np.float32)
    path = tmp_path / "index.faiss"
    save_faiss_index(build_faiss_index(items, "flat"), path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(UserError, match="index.faiss is truncated or corrupt") as e:
        load_faiss_index(path)
    assert "sparcode index" in str(e.value)
    with pytest.raises(UserError, match="missing"):
        load_faiss_index(tmp_path / "none.faiss")


def test_threads_context_restores() -> None:
    before = get_threads()
    with threads(1):
        assert get_threads() == 1
    assert get_threads() == before


def test_unknown_kind() -> None:
    with pytest.raises(ValueError, match="valid: flat, ivf, hnsw"):
        build_faiss_index(np.zeros((3, 2), np.float32), "lsh")
