"""Packing into windows, shuffling, resuming, per-host slices and mixtures."""

import numpy as np
import pytest
from conftest import two_corpora

from lmjax import config, sharding
from lmjax.data import cache, loader


def _split(doc_lengths):
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]])
    return cache.Split(np.arange(sum(doc_lengths), dtype=np.uint16) % 1000, starts)


def test_windows_mark_documents():
    split = _split([5, 3, 10, 7])  # documents start at 0, 5, 8, 18
    w = loader.windows(split, np.array([3, 0]), seq_len=8)
    np.testing.assert_array_equal(w["inputs"][0], [3, 4, 5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(w["targets"][0], [4, 5, 6, 7, 8, 9, 10, 11])
    np.testing.assert_array_equal(w["segment_ids"][0], [1, 1, 2, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(w["positions"][0], [0, 1, 0, 1, 2, 0, 1, 2])
    # A target in the next document is not predicted: the boundary tokens 4->5 and 7->8.
    np.testing.assert_array_equal(w["loss_mask"][0], [1, 0, 1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(w["segment_ids"][1], [1] * 5 + [2] * 3)


def test_packing_covers_the_split_and_never_mixes_documents(stdlib_corpus):
    """Every window of the real cache, in order: tokens tile the split (only the tail under
    one window is dropped), and segments and positions follow the document starts exactly."""
    (split,) = stdlib_corpus.splits("validation")
    T = 64
    n = loader.num_windows(split, T)
    w = loader.windows(split, np.arange(n) * T, T)
    everything = split.take(np.arange(len(split)))
    np.testing.assert_array_equal(w["inputs"].ravel(), everything[: n * T])
    np.testing.assert_array_equal(w["targets"].ravel(), everything[1 : n * T + 1])
    assert len(split) - 1 - n * T < T and n * T + 1 <= len(split)  # only a short tail is dropped
    doc = np.searchsorted(split.starts, np.arange(n * T), side="right") - 1
    doc_BT = doc.reshape(n, T)
    # Same segment id <=> same document, and positions count from the document's start.
    same = w["segment_ids"][:, 1:] == w["segment_ids"][:, :-1]
    np.testing.assert_array_equal(same, doc_BT[:, 1:] == doc_BT[:, :-1])
    starts_in_window = np.maximum(split.starts[doc_BT], (np.arange(n) * T)[:, None])
    np.testing.assert_array_equal(w["positions"], np.arange(n * T).reshape(n, T) - starts_in_window)
    assert (w["inputs"][w["positions"] == 0][w["segment_ids"][w["positions"] == 0] > 1] == 1).all()  # <s>
    # Only the targets that are a next document's <s> are masked.
    np.testing.assert_array_equal(
        w["loss_mask"] == 0, np.isin(np.arange(1, n * T + 1), split.starts).reshape(n, T)
    )


def test_max_segments_is_the_most_documents_in_a_window(stdlib_corpus):
    split = _split([5, 3, 10, 7, 2, 2, 2, 9])  # starts 0 5 8 18 25 27 29 31; windows of 8
    w = loader.windows(split, np.arange(loader.num_windows(split, 8)) * 8, 8)
    assert loader.max_segments([split], 8) == w["segment_ids"].max() == 5  # window 3: 24..31
    splits = stdlib_corpus.splits("train") + stdlib_corpus.splits("validation")
    T = 64
    most = max(
        loader.windows(s, np.arange(loader.num_windows(s, T)) * T, T)["segment_ids"].max() for s in splits
    )
    assert loader.max_segments(splits, T) == most


def _batches(corpus, seed=0, rows=None, batch=8, seq=32):
    return loader.TrainBatches(corpus.splits("train"), corpus.weights, seq, batch, seed, rows=rows)


def test_same_seed_same_batches_other_seed_other_order(stdlib_corpus):
    a, b, c = _batches(stdlib_corpus), _batches(stdlib_corpus), _batches(stdlib_corpus, seed=1)
    for _ in range(3):
        x, y, z = next(a), next(b), next(c)
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        assert not np.array_equal(x["inputs"], z["inputs"])


def test_an_epoch_visits_every_window_once_then_reshuffles(tmp_path):
    split = _split([7] * 40)  # 280 tokens -> 34 windows of 8
    batches = loader.TrainBatches([split], [1.0], 8, 2, seed=3)
    firsts = np.concatenate([next(batches)["inputs"][:, 0] // 8 for _ in range(34)]).tolist()
    first_epoch, second_epoch = firsts[:34], firsts[34:]
    assert sorted(first_epoch) == list(range(34))
    assert sorted(second_epoch) == list(range(34))
    assert first_epoch != second_epoch


def test_resume_from_saved_state_continues_exactly(stdlib_corpus):
    uninterrupted = _batches(stdlib_corpus)
    expected = [next(uninterrupted)["inputs"] for _ in range(7)]
    first = _batches(stdlib_corpus)
    for _ in range(4):
        next(first)
    state = first.get_state()
    resumed = _batches(stdlib_corpus)
    resumed.set_state(state)
    for want in expected[4:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], want)
    np.testing.assert_array_equal(resumed[2]["inputs"], expected[2])  # random access agrees


def test_device_prefetch_reports_the_state_of_the_batch_it_returns_next(stdlib_corpus):
    placed = []
    prefetch = loader.DevicePrefetch(_batches(stdlib_corpus), lambda b: placed.append(1) or b["inputs"])
    assert len(placed) == 1  # one batch is ahead before the first step
    for _ in range(3):
        next(prefetch)
    assert len(placed) == 4
    state = prefetch.get_state()
    resumed = _batches(stdlib_corpus)
    resumed.set_state(state)
    np.testing.assert_array_equal(next(resumed)["inputs"], next(prefetch))


@pytest.mark.parametrize("hosts", [2, 4])
@pytest.mark.parametrize("placement", ["blocks", "interleaved"])
@pytest.mark.parametrize("mesh_axes", [(8, 1, 1), (2, 4, 1), (4, 1, 2)])
def test_simulated_hosts_read_their_rows_and_together_cover_the_batch(
    stdlib_corpus, hosts, placement, mesh_axes
):
    """Hosts own devices in blocks (0-3, 4-7) or interleaved (0,2,4,6 / 1,3,5,7): interleaved
    gives a host non-contiguous rows, and with a tensor axis across hosts, shared rows."""
    data, fsdp, tensor = mesh_axes
    exp = config.Experiment(mesh=config.Mesh(data=data, fsdp=fsdp, tensor=tensor))
    mesh = sharding.make_mesh(exp)
    with sharding.use(mesh, exp.mesh.rules):
        batch_sh = sharding.batch_sharding(mesh)
    devices = list(mesh.devices.flat)
    owner = [i * hosts // 8 if placement == "blocks" else i % hosts for i in range(8)]
    rows = [
        sharding.host_rows(batch_sh, 16, [d for d, o in zip(devices, owner, strict=True) if o == h])
        for h in range(hosts)
    ]
    whole = _batches(stdlib_corpus, batch=16)
    parts = [_batches(stdlib_corpus, rows=r, batch=16) for r in rows]
    for _ in range(2):
        want = next(whole)["inputs"]
        for r, part in zip(rows, parts, strict=True):
            np.testing.assert_array_equal(next(part)["inputs"], want[r])
    assert set(np.concatenate(rows)) == set(range(16))  # together they cover the batch
    replicas = {tuple(r) for r in rows}
    if tensor > 1 and placement == "interleaved":  # tensor pairs (0,1), (2,3)... span hosts
        assert len(replicas) < hosts
    else:
        assert sorted(np.concatenate(rows)) == list(range(16))  # and are disjoint
    if placement == "interleaved" and tensor == 1:
        assert any(np.any(np.diff(r) > 1) for r in rows)  # non-contiguous rows


def test_mixture_follows_its_weights(tmp_path):
    mixture = two_corpora(tmp_path, (0.7, 0.3), 60, "{word} {i} " * 40)
    data = config.Data(source="mixture", mixture=mixture, vocab_size=300, cache_dir=str(tmp_path / "c"))
    corpus = cache.load_or_build(data, log=lambda m: None)
    batches = loader.TrainBatches(corpus.splits("train"), corpus.weights, 32, 20, seed=0)
    words = [corpus.tokenizer.decode(row) for _ in range(50) for row in next(batches)["inputs"]]
    share = np.mean(["alpha" in w for w in words])
    assert all(("alpha" in w) != ("omega" in w) for w in words)  # a window holds one corpus
    assert share == pytest.approx(0.7, abs=0.02)  # 1000 windows: grain mixes by exact ratio
    held_out = loader.EvalBatches(corpus.splits("validation"), corpus.weights, 32, 10, 2)
    rows = [r for b in held_out for r, m in zip(b["inputs"], b["loss_mask"], strict=True) if m.any()]
    assert len(rows) == 20  # both corpora have enough validation windows
    assert np.mean(["alpha" in corpus.tokenizer.decode(r) for r in rows]) == 0.7


def test_eval_batches_pad_a_short_split_with_masked_rows():
    split = _split([9] * 5)  # 45 tokens -> 5 windows of 8
    batches = loader.EvalBatches([split], [1.0], 8, 4, 3)
    assert len(batches) == 2
    np.testing.assert_array_equal(batches[0]["inputs"][:, 0], [0, 8, 16, 24])
    assert batches[1]["loss_mask"][1:].sum() == 0 and batches[1]["loss_mask"][0].sum() > 0
    with pytest.raises(config.UserError, match="fewer than one window"):
        loader.EvalBatches([_split([4])], [1.0], 8, 4, 3)
