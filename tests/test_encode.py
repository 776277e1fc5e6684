"""Encoding: the segment-by-segment batch encoder and chunks encoded together give the same ids
and streams as encoding each text and each chunk alone."""

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from lmjax import config
from lmjax.config import Source
from lmjax.data import encode, segments, sources, tokenizer

TRICKY = [
    "",
    "x",
    " ",
    "   ",
    "\n",
    "\n\nx\n\n",
    "a  b   c    d",
    "  leading and trailing  ",
    "tab\tsep\t\tend\t",
    "a\r\nb\r\n",
    "sentencepiece's mark \u2581 and\u2581\u2581 runs \u2581",
    "ü\n日本語 テキスト  ✓ 😀",
    "x\u2028y\n",
    "    return self\n" * 5,
    "def f(x):\n    return x + 1  # ünï\n\n",
    "1234567890 3.14159 0x1f",
]


def _train(tmp_path: Path, **settings) -> tokenizer.Tokenizer:
    text = "".join(f"def f{i}(x):\n    return x + {i}  # ünï  日本\n\n" for i in range(300))
    options = dict(tokenizer.TRAINER_SETTINGS, vocab_size=400, model_type="bpe", hard_vocab_limit=False)
    options |= settings
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")), model_prefix=str(tmp_path / "m"), **options
    )
    return tokenizer.Tokenizer.load(tmp_path / "m.model")


def _assert_encodes_each_text(tok: tokenizer.Tokenizer, texts: list[str], threads: int = 0) -> None:
    flat, lengths = tok.encode_batch(texts, threads)
    whole = [tok.encode(t) for t in texts]
    np.testing.assert_array_equal(lengths, [len(x) for x in whole])
    np.testing.assert_array_equal(flat, [i for x in whole for i in x])


def test_segments_give_the_ids_of_whole_texts(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    assert tok._words_are_independent
    texts = [t for _, t in sources.documents(Source("stdlib"), 2.0)][:40] + TRICKY
    _assert_encodes_each_text(tok, texts)
    _assert_encodes_each_text(tok, texts[::-1], threads=1)  # now every segment is known
    _assert_encodes_each_text(tok, [])
    _assert_encodes_each_text(tok, ["", ""])


def test_long_texts_are_encoded_in_parts_with_the_same_ids(stdlib_corpus):
    tok = tokenizer.Tokenizer(stdlib_corpus.tokenizer.model_proto)  # nothing known yet
    docs = [t for _, t in sources.documents(Source("stdlib"), 2.0)][40:120]
    long_text = "".join(docs)
    assert len(long_text) > 2 * segments.PART_CHARS
    _assert_encodes_each_text(tok, [long_text, *TRICKY, long_text[::-1]])


def test_known_segments_start_afresh_past_the_limit(stdlib_corpus, monkeypatch):
    monkeypatch.setattr(segments, "CACHE_SIZE", 50)
    tok = tokenizer.Tokenizer(stdlib_corpus.tokenizer.model_proto)
    docs = [t for _, t in sources.documents(Source("stdlib"), 2.0)][:6]
    for doc in docs:
        _assert_encodes_each_text(tok, [doc])
        assert len(tok._known_segments.index) < 50 + len(set(segments.SEGMENT.findall(doc)))


def test_threads_sharing_a_tokenizer_get_their_own_texts_ids(stdlib_corpus):
    tok = tokenizer.Tokenizer(stdlib_corpus.tokenizer.model_proto)
    docs = [t for _, t in sources.documents(Source("stdlib"), 2.0)][:60]
    expected = [tok._sp.encode(d) for d in docs]
    failures = []

    def encode_some(k: int) -> None:
        for i in range(k, len(docs), 3):
            flat, _ = tok.encode_batch([docs[i]])
            if flat.tolist() != expected[i]:
                failures.append(i)

    threads = [threading.Thread(target=encode_some, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(), True),  # lmjax's settings: no piece runs from text into a space
        (dict(treat_whitespace_as_suffix=True), False),  # pieces like "x▁" span a segment start
        (dict(split_by_whitespace=False), False),  # pieces across spaces
        (dict(model_type="unigram"), False),  # lines are not independent either
    ],
    ids=["lmjax", "space-suffix", "across-spaces", "unigram"],
)
def test_models_whose_pieces_span_spaces_encode_whole(tmp_path, settings, words):
    tok = _train(tmp_path, **settings)
    assert tok._words_are_independent == words
    _assert_encodes_each_text(tok, TRICKY)


def test_chunks_encoded_together_equal_each_chunk_alone(tmp_path, stdlib_corpus):
    docs = [t for _, t in sources.documents(Source("stdlib"), 2.0)][:30]
    for i, doc in enumerate(docs):
        (tmp_path / f"f{i:02d}.txt").write_text(doc)
    (tmp_path / "empty.txt").write_text("")
    c = Source("files", str(tmp_path))
    chunks = sources.chunks(c, 20.0)
    assert len(chunks) == 31 and not any(ch.by_lines for ch in chunks)
    tok = stdlib_corpus.tokenizer
    together = encode.encode_chunks(c, chunks, tok, 20.0)
    splits_seen = set()
    for chunk, streams in zip(chunks, together, strict=True):
        alone = encode.encode_chunk(c, chunk, tokenizer.Tokenizer(tok.model_proto), 20.0)
        for split in ("train", "validation"):
            a, b = streams[split], alone[split]
            np.testing.assert_array_equal(a.tokens, b.tokens)
            np.testing.assert_array_equal(a.starts, b.starts)
            assert a.tokens.dtype == b.tokens.dtype and a.starts.dtype == np.int64
            assert (a.chars, a.bytes) == (b.chars, b.bytes)
            splits_seen.add((split, len(a.starts)))
    assert ("validation", 1) in splits_seen and ("validation", 0) in splits_seen  # both splits occur
    # and the streams frame the documents as <s> ids </s>
    text = (tmp_path / "f00.txt").read_text()
    first = together[[ch.key for ch in chunks].index("f00.txt")]
    stream = next(s for s in first.values() if len(s.starts))
    assert stream.tokens.tolist() == [tok.bos_id, *tok.encode(text), tok.eos_id]
    assert stream.chars == len(text) and stream.bytes == len(text.encode())


def test_builds_on_threads_on_processes_and_one_file_at_a_time_are_the_same(
    tmp_path, stdlib_corpus, monkeypatch
):
    """This process runs JAX, so its builds encode on threads; `python -m lmjax.data prepare`
    does not, so it encodes on forked processes (more than one group of files here)."""
    from lmjax.data import cache, cache_build

    docs = [t for _, t in sources.documents(Source("stdlib"), 2.0)][:120]
    assert sum(map(len, docs)) > 2 * cache_build._GROUP_BYTES
    (tmp_path / "corpus").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "corpus" / f"f{i:03d}.txt").write_text(doc)
    stdlib_corpus.tokenizer.save(tmp_path / "t.model")
    sets = {
        "data.source": "files",
        "data.path": str(tmp_path / "corpus"),
        "data.tokenizer_path": str(tmp_path / "t.model"),
        "data.validation_percent": "10.0",
    }

    def files_of(entry: Path) -> dict[str, bytes]:
        return {str(p.relative_to(entry)): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}

    def build(name: str) -> dict[str, bytes]:
        cfg = config.apply_overrides(
            config.load_experiment("stdlib_tiny"),
            [f"{k}={v}" for k, v in sets.items()] + [f"data.cache_dir={tmp_path / name}"],
        ).data
        return files_of(Path(cache.load_or_build(cfg, lambda m: None, False).entry))

    threads = build("threads")
    argv = [sys.executable, "-m", "lmjax.data", "prepare", "--experiment", "stdlib_tiny"]
    argv += [
        a
        for k, v in {**sets, "data.cache_dir": str(tmp_path / "processes")}.items()
        for a in ("--set", f"{k}={v}")
    ]
    subprocess.run(argv, check=True, capture_output=True)
    (entry,) = (tmp_path / "processes").iterdir()
    processes = files_of(entry)
    monkeypatch.setattr(cache_build, "_GROUP_BYTES", 0)  # every file its own group
    alone = build("alone")
    assert threads.keys() == processes.keys() == alone.keys()
    for name in threads:
        if name != "meta.json":
            assert threads[name] == processes[name] == alone[name], name
