"""What meta.json records so that start-up does not grow with the corpus: the most documents a
window holds and the corpus identity (equal to what the starts give), and shards opened only
when first read (the same tokens, and a shard that does not parse named when it is read)."""

import hashlib
import importlib.util
import json
import random
import string
import sys
from pathlib import Path

import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from conftest import tiny_experiment

from lmjax import resume
from lmjax.config import Data
from lmjax.data import cache, loader, shards
from lmjax.data.cache_meta import SPLITS, SUMMARY_SEQ_LENS, corpus_identity, most_documents, summarize

LETTERS = string.ascii_letters + " \n"


def scanned(starts: np.ndarray, n_tokens: int, seq_len: int) -> int:
    """loader.max_segments's count over every window, of a split that records nothing."""
    return loader.max_segments([cache.Split(np.zeros(n_tokens, np.uint16), starts)], seq_len)


def random_starts(rng: np.random.Generator, seq_len: int) -> tuple[np.ndarray, int]:
    """Documents of a few tokens or up to 3 windows' tokens, some exactly whole windows (starts on a window's
    first token), and a token count that may leave no window, one, or a tail after the last."""
    n_docs = int(rng.integers(1, 40))
    lengths = np.where(
        rng.random(n_docs) < 0.5, rng.integers(1, 4, n_docs), rng.integers(1, 3 * seq_len, n_docs)
    )
    whole = rng.random(n_docs) < 0.3
    lengths[whole] = seq_len * rng.integers(1, 3, whole.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return starts, int(lengths.sum())


def test_most_documents_equals_the_scan_on_random_starts():
    rng = np.random.default_rng(0)
    windows_seen = set()
    for _ in range(600):
        seq_len = int(rng.choice([1, 2, 3, 7, 8, 16, 64]))
        starts, n_tokens = random_starts(rng, seq_len)
        windows_seen.add(min((n_tokens - 1) // seq_len, 2))
        assert most_documents(starts, n_tokens, seq_len) == scanned(starts, n_tokens, seq_len)
    assert windows_seen == {0, 1, 2}  # no window, one window, and more were all checked


def test_most_documents_counts_the_covering_document_and_those_starting_inside():
    starts = np.array([0, 5, 8, 18, 25, 27, 29, 31, 33])  # windows of 8: 0..7, 8..15, 16..23, 24..31
    assert most_documents(starts, 34, 8) == 5  # window 24..31: 18's, then 25, 27, 29, 31
    assert most_documents(starts, 32, 8) == 2  # three windows only: 0..7 and 16..23 hold two
    assert most_documents(starts, 8, 8) == 1  # no whole window
    assert most_documents(np.array([0, 8, 16]), 25, 8) == 1  # every document starts a window


@pytest.fixture(scope="module")
def built_data(tmp_path_factory, stdlib_corpus) -> Data:
    """A jsonl corpus of documents of very different lengths (so windows hold several), with the
    session's tokenizer."""
    folder = tmp_path_factory.mktemp("summary")
    rng = random.Random(0)
    docs = ["".join(rng.choices(LETTERS, k=rng.choice([3, 20, 200, 900]))) for _ in range(300)]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    stdlib_corpus.tokenizer.save(folder / "t.model")
    data = Data(
        source="jsonl",
        path=str(folder / "a.jsonl"),
        tokenizer_path=str(folder / "t.model"),
        validation_percent=10,
        cache_dir=str(folder / "cache"),
    )
    cache.load_or_build(data, log=lambda m: None)
    return data


@pytest.fixture(scope="module")
def built(built_data) -> cache.Corpus:
    """The corpus of `built_data`, built now."""
    return cache.load_or_build(built_data, log=lambda m: None)


def unsummarized(corpus: cache.Corpus) -> cache.Corpus:
    """`corpus` as an entry written before meta.json recorded summaries reads."""
    parts = [{s: cache.Split(p[s].tokens, p[s].starts) for s in SPLITS} for p in corpus.parts]
    meta = {k: v for k, v in corpus.meta.items() if k != "identity"}
    return cache.Corpus(corpus.tokenizer, parts, corpus.weights, corpus.entry, meta)


def test_a_built_entry_records_the_scan_for_every_window_length(built):
    for s in SPLITS:
        (split,) = built.splits(s)
        recorded = built.meta["parts"][0][s]["most_documents"]
        assert split.most_documents == recorded
        assert list(recorded) == [str(T) for T in SUMMARY_SEQ_LENS]
        assert recorded == {str(T): scanned(split.starts, len(split), T) for T in SUMMARY_SEQ_LENS}
        assert recorded["16"] > 2 and recorded["1048576"] == 1  # many documents a window; no window at all


def test_identity_in_meta_is_the_one_the_starts_give(built):
    """Bit for bit the definition checkpoints hold: sha256 of the tokenizer, then per corpus and
    split "name:tokens:" and the int64 starts, 20 hex digits."""
    h = hashlib.sha256(built.tokenizer.model_proto)
    for s in SPLITS:
        (split,) = built.splits(s)
        h.update(f"{s}:{len(split)}:".encode())
        h.update(np.asarray(split.starts, np.int64).tobytes())
    assert built.meta["identity"] == h.hexdigest()[:20] == built.identity == unsummarized(built).identity
    moved = [{s: (len(p[s]), p[s].starts + (s == "train"), None) for s in SPLITS} for p in built.parts]
    assert corpus_identity(built.tokenizer.model_proto, moved) != built.identity


def test_summarize_gives_what_the_build_recorded(built):
    meta = json.loads((built.entry / "meta.json").read_text())
    recorded = json.loads(json.dumps(meta))
    for part in meta["parts"]:
        for s in SPLITS:
            del part[s]["most_documents"]
    del meta["identity"]
    summarize(meta, built.tokenizer.model_proto, [{s: built.splits(s)[0].starts for s in SPLITS}])
    assert meta == recorded


@pytest.mark.parametrize("seq_len", [16, 32, 256, 48])  # 48: not recorded, so counted
def test_start_up_gives_the_max_segments_of_the_scan(built, seq_len):
    exp = tiny_experiment("gpt2", f"model.seq_len={seq_len}", "model.vocab_size=0")
    assert exp.model.max_segments == 0
    resolved = resume.resolve_from_data(exp, built).model.max_segments
    assert resolved == resume.resolve_from_data(exp, unsummarized(built)).model.max_segments
    assert resolved == max(scanned(s.starts, len(s), seq_len) for p in built.parts for s in p.values())


def test_max_segments_reads_the_record_only_when_every_split_has_it():
    starts = np.array([0, 3, 6, 9])
    recorded = cache.Split(np.zeros(40, np.uint16), starts, {"8": 7})
    plain = cache.Split(np.zeros(40, np.uint16), starts)
    assert loader.max_segments([recorded], 8) == 7
    assert loader.max_segments([recorded, plain], 8) == loader.max_segments([plain], 8) == 3
    assert loader.max_segments([recorded], 16) == 4  # no record for 16: counted


@pytest.fixture
def small_shards(tmp_path, monkeypatch, stdlib_corpus) -> cache.Corpus:
    """A corpus built in blocks of 16 tokens, 3 a shard (dozens of shards), opened again once
    shards.SHARD_BLOCKS is back to its value: the reader takes the shards' blocks from meta.json."""
    monkeypatch.setattr(shards, "BLOCK_TOKENS", 16)
    monkeypatch.setattr(shards, "SHARD_BLOCKS", 3)
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": f"line {i} " * (i % 9)}) + "\n" for i in range(80))
    )
    stdlib_corpus.tokenizer.save(tmp_path / "t.model")
    data = Data(
        source="jsonl",
        path=str(tmp_path / "a.jsonl"),
        tokenizer_path=str(tmp_path / "t.model"),
        cache_dir=str(tmp_path / "c"),
    )
    cache.load_or_build(data, log=lambda m: None)
    monkeypatch.undo()
    corpus = cache.load_or_build(data, log=lambda m: None)
    assert corpus.meta["shard_blocks"] == 3 and len(corpus.meta["parts"][0]["train"]["shards"]) > 10
    return corpus


def all_records(paths: list[Path], dtype: np.dtype) -> np.ndarray:
    """Every block of every shard, each shard opened and read whole: the tokens, read eagerly."""
    blocks = []
    for path in paths:
        reader = ArrayRecordReader(str(path))
        blocks += [np.frombuffer(r, dtype) for r in reader.read_all()]
        reader.close()
    return np.concatenate(blocks)


def test_lazily_opened_shards_read_the_tokens_across_shard_boundaries(small_shards):
    (split,) = small_shards.splits("train")
    paths = [small_shards.entry / "c0" / n for n in small_shards.meta["parts"][0]["train"]["shards"]]
    everything = all_records(paths, split.tokens.dtype)
    assert len(everything) == len(split)
    np.testing.assert_array_equal(split.take(np.arange(len(split))), everything)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(split), (5, 40))  # random tokens from many shards in one take
    np.testing.assert_array_equal(split.take(idx), everything[idx])
    boundary = 3 * 16 * np.arange(1, len(paths))  # the first token of each shard but the first
    idx = np.stack([boundary - 1, boundary])
    np.testing.assert_array_equal(split.take(idx), everything[idx])


def test_a_shard_is_opened_when_first_read_and_named_when_it_does_not_parse(small_shards):
    (split,) = small_shards.splits("train")
    paths = [small_shards.entry / "c0" / n for n in small_shards.meta["parts"][0]["train"]["shards"]]
    paths[2].write_bytes(b"not an ArrayRecord file")
    paths[4].unlink()
    blocks = shards.Blocks(paths, len(split), split.tokens.dtype, 16, 3)  # opens no file
    np.testing.assert_array_equal(blocks.take(np.arange(2 * 48)), split.take(np.arange(2 * 48)))
    for shard, why in ((2, "64KB"), (4, "No such file")):
        with pytest.raises(shards.Unreadable) as raised:
            blocks.take(np.array([0, shard * 48 + 5]))
        assert raised.value.path == paths[shard] and why in raised.value.problem
    with pytest.raises(shards.Unreadable) as raised:
        blocks.check()
    assert raised.value.path == paths[2]


def test_a_shard_holding_other_blocks_than_the_token_count_is_named(small_shards, tmp_path):
    (split,) = small_shards.splits("train")
    paths = [small_shards.entry / "c0" / n for n in small_shards.meta["parts"][0]["train"]["shards"]]
    with pytest.raises(shards.Unreadable, match=f"the {len(paths)} shards of 3 blocks are not the"):
        shards.Blocks(paths, len(split) + 3 * 16, split.tokens.dtype, 16, 3)  # no file opened to say so
    writer = ArrayRecordWriter(str(tmp_path / "short.array_record"), "group_size:1")
    writer.write(np.zeros(16, split.tokens.dtype).tobytes())
    writer.close()
    blocks = shards.Blocks([paths[0], tmp_path / "short.array_record"], 6 * 16, split.tokens.dtype, 16, 3)
    np.testing.assert_array_equal(blocks.take(np.arange(4 * 16)), np.r_[split.take(np.arange(48)), [0] * 16])
    with pytest.raises(shards.Unreadable) as raised:
        blocks.take(np.array([5 * 16]))  # block 5: the short shard's third
    assert raised.value.path == tmp_path / "short.array_record"
    assert raised.value.problem == "holds 1 blocks, expected 3"


def test_an_entry_without_records_opens_every_shard_at_once(small_shards):
    paths = small_shards.meta["parts"][0]["train"]["shards"]
    (small_shards.entry / "c0" / paths[1]).write_bytes(b"x" * 70_000)
    meta = {k: v for k, v in small_shards.meta.items() if k != "files"}
    data = Data(source="jsonl", path="unused")
    with pytest.raises(cache.Damage, match=f"c0/{paths[1]}: "):
        cache.open_corpus(data, small_shards.entry, meta, small_shards.entry)
    cache.open_corpus(data, small_shards.entry, small_shards.meta, small_shards.entry)  # recorded: lazy


def test_the_startup_benchmark_measures_each_stage(built_data, built):
    path = Path(__file__).parents[1] / "benchmarks" / "data_startup.py"
    sys.path.insert(0, str(path.parent))  # it imports its neighbour measure.py
    spec = importlib.util.spec_from_file_location("data_startup", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as done:
        bench.main(["--help"])
    assert done.value.code == 0
    stages = bench.startup(built_data, 64, 4)
    assert list(stages) == list(bench.STAGES)
    assert all(m["seconds"] > 0 and m["peak_rss_mb"] >= 0 for m in stages.values())
    splits = [s for p in built.parts for s in p.values()]
    assert stages["max_segments"]["value"] == loader.max_segments(splits, 64) > 1
