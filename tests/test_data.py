"""Sources, the lossless tokenizer and the token cache."""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import two_corpora

from lmjax import config
from lmjax.config import Source, UserError
from lmjax.data import cache, shards, sources, tokenizer
from lmjax.data.__main__ import main as data_main
from lmjax.data.files import is_validation, stdlib_files, user_files


def _docs(c: Source, percent: float = 2.0) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "validation": []}
    for split, text in sources.documents(c, percent):
        out[split].append(text)
    return out


def test_stdlib_split_is_stable_and_small():
    root, files = stdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    val = [r for r in rel if is_validation(r, 2.0)]
    assert 0.005 < len(val) / len(rel) < 0.05
    assert not any("/test/" in f"/{r}" or r.startswith("idlelib/") for r in rel)
    docs = _docs(Source("stdlib"))
    assert docs == _docs(Source("stdlib"))  # a pure function of the files
    assert len(docs["validation"]) == len(val)
    assert docs["validation"][0] == (root / val[0]).read_text(errors="replace")


def test_tokenizer_round_trip_is_lossless(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    sample = _docs(Source("stdlib"))["validation"] + [
        "naïve café — 日本語 😀\n\tindent\r\n  trailing  \n\n",
        "\x00\x01 control \u2028 separators \ufeff",
    ]
    for text in sample:
        assert tok.decode(tok.encode(text)) == text
    # The documented exception: sentencepiece's own space mark U+2581 decodes as a space.
    assert tok.decode(tok.encode("a\u2581b")) == "a b"


def _foreign_tokenizer(tmp_path, **settings) -> Path:
    """A sentencepiece model trained with other settings than lmjax's, as users bring them."""
    import sentencepiece as spm

    text = "".join(f"def f{i}(x):\n    return x + {i}  # ünï\n\n" for i in range(300))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.split("\n")),
        model_prefix=str(tmp_path / "foreign"),
        vocab_size=200,
        minloglevel=2,
        **settings,
    )
    return tmp_path / "foreign.model"


@pytest.mark.parametrize(
    "settings",
    [
        None,  # lmjax's own: encoded line by line
        dict(model_type="bpe", add_dummy_prefix=True, normalization_rule_name="identity"),  # LLaMA-like
        dict(model_type="unigram", user_defined_symbols=["\n"], add_dummy_prefix=False),
    ],
    ids=["lmjax", "dummy-prefix", "unigram"],
)
def test_batch_encoding_equals_encoding_each_text(stdlib_corpus, tmp_path, settings):
    tok = (
        stdlib_corpus.tokenizer
        if settings is None
        else tokenizer.Tokenizer.load(_foreign_tokenizer(tmp_path, **settings))
    )
    assert tok._lines_are_independent == (settings is None)
    texts = _docs(Source("stdlib"))["validation"][:5]
    texts += ["no newline", "\n", "\n\nx\n\n", "a\r\nb\r\n", "  indented\n\tend", "ü\n日本", "x\u2028y\n"]
    flat, lengths = tok.encode_batch(texts)
    whole = [tok.encode(t) for t in texts]
    np.testing.assert_array_equal(lengths, [len(x) for x in whole])
    np.testing.assert_array_equal(flat, [i for x in whole for i in x])


def test_a_tokenizer_without_bos_or_eos_is_a_user_error(tmp_path, capsys):
    model = _foreign_tokenizer(tmp_path, bos_id=-1)
    argv = ["prepare", "--experiment", "stdlib_tiny", "--set", f"data.tokenizer_path={model}"]
    assert data_main([*argv, "--set", f"data.cache_dir={tmp_path / 'c'}"]) == 2
    assert "no <s> or </s> piece" in capsys.readouterr().err


def test_invalid_utf8_becomes_replacement_character(tmp_path, stdlib_corpus):
    (tmp_path / "a.txt").write_bytes(b"good \xff\xfe bad\n" * 50)
    (text,) = _docs(Source("files", str(tmp_path / "a.txt")))["train"]
    assert text.startswith("good \ufffd\ufffd bad\n")
    tok = stdlib_corpus.tokenizer
    assert tok.decode(tok.encode(text)) == text  # U+FFFD itself round-trips (byte fallback)


def test_token_bytes_count_the_utf8_bytes(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    table = tok.token_bytes()
    for text in ["def f(x):\n    return x ** 2  # ok\n", "ünïcödé 漢字 and bytes \x07"]:
        ids = [tok.bos_id, *tok.encode(text), tok.eos_id]
        assert table[ids].sum() == len(text.encode())


def test_cache_holds_every_document_between_bos_and_eos(stdlib_corpus):
    tok = stdlib_corpus.tokenizer
    docs = _docs(Source("stdlib"))
    for name in ("train", "validation"):
        (split,) = stdlib_corpus.splits(name)
        assert len(split.starts) == len(docs[name])
        assert (split.take(split.starts) == tok.bos_id).all()
        ends = np.append(split.starts[1:], len(split)) - 1
        assert (split.take(ends) == tok.eos_id).all()
        for i in (0, len(docs[name]) // 2, len(docs[name]) - 1):
            assert tok.decode(split.take(np.arange(split.starts[i] + 1, ends[i]))) == docs[name][i]


def test_single_file_is_split_by_lines(tmp_path):
    path = tmp_path / "shakespeare.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200)))
    docs = _docs(Source("files", str(path)))
    assert docs["validation"] == ["".join(f"line {i}\n" for i in range(196, 200))]
    assert docs["train"] == ["".join(f"line {i}\n" for i in range(196))]


def _write_jsonl(path, n, field="text"):
    path.write_text("".join(json.dumps({field: f"doc {i} " * 5, "id": i}) + "\n" for i in range(n)))


def test_jsonl_and_parquet_read_the_named_field(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    _write_jsonl(tmp_path / "a.jsonl", 300, field="body")
    pq.write_table(
        pa.table({"content": [f"doc {i} " * 5 for i in range(300)], "n": list(range(300))}),
        tmp_path / "a.parquet",
    )
    from_jsonl = _docs(Source("jsonl", str(tmp_path / "*.jsonl"), field="body"), 10.0)
    from_parquet = _docs(Source("parquet", str(tmp_path / "a.parquet"), field="content"), 10.0)
    assert sorted(from_jsonl["train"] + from_jsonl["validation"]) == sorted(
        f"doc {i} " * 5 for i in range(300)
    )
    assert 10 < len(from_jsonl["validation"]) < 60  # about 10% of 300, by a hash of file:line
    assert 10 < len(from_parquet["validation"]) < 60
    assert from_jsonl == _docs(Source("jsonl", str(tmp_path / "*.jsonl"), field="body"), 10.0)


@pytest.mark.parametrize(
    "make, source, message",
    [
        (lambda p: None, Source("files", "{p}/nothing"), "matches no files"),
        (lambda p: (p / "e.txt").write_text(""), Source("files", "{p}/*.txt"), "is empty"),
        (
            lambda p: _write_jsonl(p / "a.jsonl", 5),
            Source("jsonl", "{p}/a.jsonl", field="txt"),
            "no field 'txt'",
        ),
        (lambda p: (p / "a.jsonl").write_text("{oops\n"), Source("jsonl", "{p}/a.jsonl"), "a.jsonl:1 is not"),
        (
            lambda p: (p / "a.parquet").write_bytes(b"PAR1 not parquet"),
            Source("parquet", "{p}/a.parquet"),
            "not a readable Parquet",
        ),
    ],
)
def test_bad_corpus_is_a_user_error(tmp_path, make, source, message):
    make(tmp_path)
    c = Source(source.source, source.path.format(p=tmp_path), field=source.field)
    data = config.Data(source=c.source, path=c.path, field=c.field, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match=message):
        cache.load_or_build(data, log=lambda m: None)


def test_parquet_without_the_column_names_the_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"no column 'text'; set data.field to one of \['body'\]"):
        list(sources.documents(Source("parquet", str(tmp_path / "a.parquet")), 2.0))


def test_tokenizer_file_is_loaded_and_bad_file_rejected(tmp_path, stdlib_corpus):
    good = tmp_path / "t.model"
    stdlib_corpus.tokenizer.save(good)
    assert tokenizer.Tokenizer.load(good).vocab_size == stdlib_corpus.tokenizer.vocab_size
    (tmp_path / "bad.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a sentencepiece model"):
        tokenizer.Tokenizer.load(tmp_path / "bad.model")


def test_tokenizer_sample_is_bounded_and_follows_the_weights(tmp_path):
    mixture = two_corpora(tmp_path, (3.0, 1.0), 200, "{word} {i}\n" * 50)
    data = config.Data(source="mixture", mixture=mixture, tokenizer_sample_bytes=40_000)
    sample = tokenizer.sample(data)
    assert sample == tokenizer.sample(data)
    chars = Counter("a" if t.startswith("alpha") else "b" for t in sample for _ in range(len(t)))
    assert 30_000 <= chars["a"] + chars["b"] <= 40_000
    assert chars["a"] / (chars["a"] + chars["b"]) == pytest.approx(0.75, abs=0.05)


def test_prepare_builds_the_cache_and_reports_it(tmp_path, capsys):
    _write_jsonl(tmp_path / "a.jsonl", 400)
    argv = ["prepare", "--experiment", "stdlib_tiny", "--set", "data.source=jsonl"]
    argv += ["--set", f"data.path={tmp_path / 'a.jsonl'}", "--set", "data.vocab_size=280"]
    argv += ["--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert data_main(argv) == 0
    out = capsys.readouterr().out
    assert "280-piece tokenizer" in out and "train: " in out and "validation: " in out
    assert data_main([*argv[:-2], "--set", "data.path=/nonexistent.jsonl"]) == 2
    assert "matches no files" in capsys.readouterr().err


def test_a_cache_build_killed_halfway_is_rebuilt_not_read(tmp_path, stdlib_corpus):
    """SIGKILL a real `prepare` once it has written token shards; the next build starts over."""
    stdlib_corpus.tokenizer.save(tmp_path / "t.model")  # skip tokenizer training: get to the shards
    sets = [f"data.tokenizer_path={tmp_path / 't.model'}", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = config.apply_overrides(config.load_experiment("stdlib_tiny"), sets).data
    argv = [sys.executable, "-m", "lmjax.data", "prepare", "--experiment", "stdlib_tiny"]
    proc = subprocess.Popen([*argv, *(a for s in sets for a in ("--set", s))], stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list((tmp_path / "cache").glob(".*.tmp/c0/train-*.array_record")):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it was killed"
        time.sleep(0.005)
    workers = _children(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert workers  # the encoding pool's processes, which must not outlive the build
    while (left := [pid for pid in workers if _running(pid)]) and time.time() < deadline:
        time.sleep(0.05)
    assert not left, f"the killed build's pool processes {left} are still running"
    assert not cache.entry_path(cfg).exists()  # the half-built entry is not in place
    corpus = cache.load_or_build(cfg, log=lambda m: None)
    assert not list((tmp_path / "cache").glob(".*.tmp"))  # the abandoned build was cleaned up
    (split,) = corpus.splits("train")
    (reference,) = stdlib_corpus.splits("train")
    assert len(split) == len(reference)
    np.testing.assert_array_equal(split.take(np.arange(len(split))), reference.take(np.arange(len(split))))


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (an orphan's parent may never reap it here)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_interrupted_build_in_process_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "corpus").mkdir()
    for i in range(30):
        (tmp_path / "corpus" / f"{i}.txt").write_text(f"document {i}\n" * 200)
    cfg = config.Data(
        source="files", path=str(tmp_path / "corpus"), vocab_size=290, cache_dir=str(tmp_path / "c")
    )

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        cache.load_or_build(cfg, log=lambda m: None)
    monkeypatch.undo()
    assert list((tmp_path / "c").iterdir()) == []
    corpus = cache.load_or_build(cfg, log=lambda m: None)
    assert corpus.tokenizer.decode(corpus.splits("train")[0].take(np.arange(1, 10))).startswith("document")


def test_cache_key_follows_corpus_and_settings(tmp_path, stdlib_corpus):
    _write_jsonl(tmp_path / "a.jsonl", 10)
    stdlib_corpus.tokenizer.save(tmp_path / "t.model")
    path = str(tmp_path / "*.jsonl")
    base = config.Data(source="jsonl", path=path)
    variants = [
        config.Data(source="jsonl", path=path, field="id"),
        config.Data(source="jsonl", path=path, vocab_size=999),
        config.Data(source="jsonl", path=path, validation_percent=5),
        config.Data(source="jsonl", path=path, tokenizer_path=str(tmp_path / "t.model")),
        config.Data(source="mixture", mixture=(Source("jsonl", path), Source("stdlib"))),
        config.Data(source="mixture", mixture=(Source("jsonl", path, weight=2), Source("stdlib"))),
    ]
    keys = {cache.cache_key(base)} | {cache.cache_key(v) for v in variants}
    assert len(keys) == 1 + len(variants)
    assert cache.cache_key(base) == cache.cache_key(config.Data(source="jsonl", path=path))
    _write_jsonl(tmp_path / "b.jsonl", 3)  # the glob matches one more file
    assert cache.cache_key(base) not in keys
    keys.add(cache.cache_key(base))
    _write_jsonl(tmp_path / "a.jsonl", 11)  # a file changes
    assert cache.cache_key(base) not in keys


def test_block_shards_hold_the_stream_exactly(tmp_path, monkeypatch, stdlib_corpus):
    """Tiny blocks and shards: many shard files and a short last block read back exactly."""
    monkeypatch.setattr(shards, "BLOCK_TOKENS", 16)
    monkeypatch.setattr(shards, "SHARD_BLOCKS", 3)
    texts = [f"line {i}\n" * (i % 7 + 1) for i in range(50)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    stdlib_corpus.tokenizer.save(tmp_path / "t.model")
    data = config.Data(
        source="jsonl",
        path=str(tmp_path / "a.jsonl"),
        tokenizer_path=str(tmp_path / "t.model"),
        cache_dir=str(tmp_path / "c"),
    )
    corpus = cache.load_or_build(data, log=lambda m: None)
    tok = corpus.tokenizer
    docs = _docs(data.components()[0])
    for name in ("train", "validation"):
        (split,) = corpus.splits(name)
        want = [i for t in docs[name] for i in (tok.bos_id, *tok.encode(t), tok.eos_id)]
        assert len(split) == len(want) and len(want) % 16 != 0  # the last block is short
        np.testing.assert_array_equal(split.take(np.arange(len(want))), want)
        idx = np.random.default_rng(0).integers(0, len(want), (7, 33))
        np.testing.assert_array_equal(split.take(idx), np.array(want)[idx])
    assert len(list((cache.entry_path(data) / "c0").glob("train-*.array_record"))) > 3


def test_folders_skip_hidden_and_underscore_files_and_take_the_suffix(tmp_path):
    (tmp_path / ".git" / "objects").mkdir(parents=True)
    (tmp_path / ".git" / "objects" / "pack").write_text("binary junk")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "README.md").write_text("about")
    _write_jsonl(tmp_path / "a.jsonl", 3)
    _, files = user_files(str(tmp_path))
    assert sorted(p.name for p in files) == ["README.md", "a.jsonl"]
    _, files = user_files(str(tmp_path), (".jsonl",))
    assert [p.name for p in files] == ["a.jsonl"]


def test_jsonl_text_must_be_text_and_bad_bytes_are_replaced(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'{"text": "caf\xff"}\n{"text": null}\n{"text": 7}\n')
    stream = sources.documents(Source("jsonl", str(tmp_path / "a.jsonl")), 2.0)
    assert next(stream)[1] == "caf\ufffd"  # then null is an empty document, skipped
    with pytest.raises(UserError, match=r"a.jsonl:3: 'text' holds int, not text"):
        next(stream)


def test_an_unwritable_cache_dir_is_a_user_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    argv = ["prepare", "--experiment", "stdlib_tiny", "--set", f"data.cache_dir={tmp_path / 'file' / 'c'}"]
    assert data_main(argv) == 2
    assert "cannot write the token cache" in capsys.readouterr().err
