"""Corpus split, lossless tokenizer, token cache and windows."""

import numpy as np
import pytest
from conftest import TINY_DATA

from lmjax import config
from lmjax.config import UserError
from lmjax.data import cache, loader, sources, tokenizer


def test_stdlib_split_is_stable_and_small(stdlib_corpus):
    root, files = sources.stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    val = [r for r in rel if sources.is_validation(r, 2.0)]
    assert 0.005 < len(val) / len(rel) < 0.05
    assert val == [r for r in rel if sources.is_validation(r, 2.0)]  # a pure function of the path
    assert not any("/test/" in f"/{r}" or r.startswith("idlelib/") for r in rel)
    assert len(stdlib_corpus.splits["validation"].tokens) > 10_000


def test_tokenizer_round_trip_is_lossless(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    docs = sources.documents(TINY_DATA)
    sample = docs["validation"][:20] + [
        "naïve café — 日本語 😀\n\tindent\r\n  trailing  \n\n",
        "\x00\x01 control \u2028 separators \ufeff",
    ]
    for text in sample:
        assert tok.decode(tok.encode(text)) == text


def test_invalid_utf8_becomes_replacement_character(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"good \xff\xfe bad\n" * 50)
    docs = sources.documents(config.Data(source="files", path=str(tmp_path)))
    assert "good \ufffd\ufffd bad" in docs["train"][0]


def test_token_bytes_count_the_utf8_bytes(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    table = tok.token_bytes()
    for text in ["def f(x):\n    return x ** 2  # ok\n", "ünïcödé 漢字 and bytes \x07"]:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert table[ids].sum() == len(text.encode())


def test_cache_holds_documents_between_bos_and_eos(stdlib_corpus):
    split = stdlib_corpus.splits["train"]
    tok = stdlib_corpus.tokenizer
    assert (split.tokens[split.starts] == tok.bos_id).all()
    assert (split.tokens[split.starts[1:] - 1] == tok.eos_id).all()
    first = tok.decode(split.tokens[1 : split.starts[1] - 1])
    assert first == sources.documents(TINY_DATA)["train"][0]


def test_interrupted_cache_build_is_never_read(tmp_path, monkeypatch):
    cfg = config.Data(
        source="files", path=str(tmp_path / "corpus"), vocab_size=290, cache_dir=str(tmp_path / "c")
    )
    (tmp_path / "corpus").mkdir()
    for i in range(30):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i} " * 200)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(cfg, log=lambda m: None)
    monkeypatch.undo()
    assert not (cache.cache_root(cfg) / cache.key(cfg)).exists()
    corpus = cache.load_or_build(cfg, log=lambda m: None)
    assert corpus.tokenizer.decode(corpus.splits["train"].tokens[1:10]).startswith("document")


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


def test_windows_wrap_a_short_split_as_new_documents():
    split = _split([4, 4])
    w = loader.windows(split, np.array([6]), seq_len=6)
    np.testing.assert_array_equal(w["inputs"][0], [6, 7, 0, 1, 2, 3])
    np.testing.assert_array_equal(w["segment_ids"][0], [1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(w["positions"][0], [0, 1, 0, 1, 2, 3])


def test_train_batches_are_a_function_of_seed_and_step(stdlib_corpus):
    split = stdlib_corpus.splits["train"]
    a, b = loader.TrainBatches(split, 64, 4, seed=0), loader.TrainBatches(split, 64, 4, seed=1)
    np.testing.assert_array_equal(a(5)["inputs"], loader.TrainBatches(split, 64, 4, seed=0)(5)["inputs"])
    assert not np.array_equal(a(5)["inputs"], a(6)["inputs"])
    assert not np.array_equal(a(5)["inputs"], b(5)["inputs"])


def test_single_file_is_split_by_lines(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200)))
    docs = sources.documents(config.Data(source="files", path=str(path)))
    assert docs["validation"] == ["".join(f"line {i}\n" for i in range(196, 200))]
    assert docs["train"][0].endswith("line 195\n")


@pytest.mark.parametrize("setup", ["missing", "empty"])
def test_missing_or_empty_corpus_is_a_user_error(tmp_path, setup):
    if setup == "empty":
        (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="matches no files|is empty"):
        sources.documents(
            config.Data(source="files", path=str(tmp_path / ("nothing" if setup == "missing" else "*.txt")))
        )


def test_tokenizer_file_is_loaded_and_bad_file_rejected(tmp_path, stdlib_corpus):
    good = tmp_path / "t.model"
    stdlib_corpus.tokenizer.save(good)
    assert tokenizer.Tokenizer.load(good).vocab_size == stdlib_corpus.tokenizer.vocab_size
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        tokenizer.Tokenizer.load(tmp_path / "bad.model")
