"""Corpora, token caches and tokenizers on a bucket, against a real GCS server (fake-gcs-server,
tests/gcs.py): the same files give the same documents, split, tokens and corpus identity on a
bucket as in a local folder; a token cache on a bucket is built once, made whole by its
meta.json alone, and read through a local mirror."""

import io
import json
import shutil

import numpy as np
import pytest

from lmjax import storage
from lmjax.config import Data, Source, UserError
from lmjax.data import cache, sources, tokenizer
from lmjax.data.files import user_files

VOCAB = 300  # bytes, control pieces, the corpus's characters and a few merges
PERCENT = 10.0


def write_corpus(root: str, kind: str) -> None:
    """The same small corpus under a local folder or a bucket folder: files at two depths, and
    files a folder skips (hidden, underscore, other suffixes)."""
    root = storage.path(root)
    for folder in ("sub", "_tmp", ".hidden"):
        (root / folder).mkdir(parents=True, exist_ok=True)  # a no-op on a bucket
    if kind == "jsonl":
        for name, n in (("a.jsonl", 60), ("sub/b.jsonl", 50), ("_tmp/c.jsonl", 5), (".hidden/d.jsonl", 5)):
            lines = [json.dumps({"text": f"{name} line {i}: " + "word " * (i % 7)}) for i in range(n)]
            (root / name).write_text("\n".join(lines) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        for name, n in (("a.parquet", 70), ("sub/b.parquet", 40)):
            data = io.BytesIO()
            pq.write_table(pa.table({"text": [f"{name} row {i} " * (1 + i % 5) for i in range(n)]}), data)
            (root / name).write_bytes(data.getvalue())
    (root / "_SUCCESS").write_text("")
    (root / "notes.txt").write_text("not a document\n")


def documents(kind: str, path: str) -> list[tuple[str, str]]:
    return list(sources.documents(Source(kind, path), PERCENT))


def window_tokens(corpus: cache.Corpus) -> list[np.ndarray]:
    """Some windows of every split: what training would read."""
    out = []
    for name in cache.SPLITS:
        for split in corpus.splits(name):
            idx = np.random.default_rng(0).integers(0, len(split), (4, 17))
            out.append(split.take(idx))
    return out


def assert_same_corpus(a: cache.Corpus, b: cache.Corpus) -> None:
    assert a.identity == b.identity
    assert a.tokenizer.model_proto == b.tokenizer.model_proto
    assert a.meta["parts"] == b.meta["parts"]
    for x, y in zip(window_tokens(a), window_tokens(b), strict=True):
        np.testing.assert_array_equal(x, y)


def tiny(**settings) -> Data:
    """A corpus config with this file's small vocabulary and validation share."""
    return Data(**{"vocab_size": VOCAB, "validation_percent": PERCENT, **settings})


def load(cfg: Data) -> tuple[cache.Corpus, list[str]]:
    logged: list[str] = []
    return cache.load_or_build(cfg, log=logged.append, progress=False), logged


@pytest.fixture
def jsonl_corpus(tmp_path) -> str:
    write_corpus(str(tmp_path / "corpus"), "jsonl")
    return str(tmp_path / "corpus")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An empty working directory (so no local folder can stand in for the bucket) and a mirror
    of its own."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("LMJAX_MIRROR", str(tmp_path / "mirror"))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_a_corpus_on_a_bucket_equals_the_same_files_in_a_folder(bucket, tmp_path, kind):
    write_corpus(str(tmp_path / "corpus"), kind)
    write_corpus(f"{bucket}/corpus", kind)
    local, remote = documents(kind, str(tmp_path / "corpus")), documents(kind, f"{bucket}/corpus")
    assert remote == local
    splits = [split for split, _ in local]
    assert len(local) == {"jsonl": 110, "parquet": 110}[kind] and 0 < splits.count("validation") < 30
    settings = dict(source=kind, cache_dir=str(tmp_path / "cache"))
    from_folder, _ = load(tiny(path=str(tmp_path / "corpus"), **settings))
    from_bucket, _ = load(tiny(path=f"{bucket}/corpus", **settings))
    assert_same_corpus(from_bucket, from_folder)
    assert from_bucket.entry != from_folder.entry  # the cache key names where the files are


@pytest.mark.parametrize(
    "pattern",
    ["", "/*.jsonl", "/**/*.jsonl", "/sub/b.jsonl", "/[as]*/*.jsonl"],
    ids=["folder", "glob", "recursive-glob", "file", "glob-class"],
)
def test_globs_and_folders_on_a_bucket_take_the_files_a_local_path_takes(bucket, tmp_path, pattern):
    write_corpus(str(tmp_path / "corpus"), "jsonl")
    write_corpus(f"{bucket}/corpus", "jsonl")
    local_root, local_files = user_files(f"{tmp_path}/corpus{pattern}", (".jsonl",))
    bucket_root, bucket_files = user_files(f"{bucket}/corpus{pattern}", (".jsonl",))
    relative = [p.relative_to(bucket_root).as_posix() for p in bucket_files]
    assert relative == [p.relative_to(local_root).as_posix() for p in local_files]
    expected = {
        "": ["a.jsonl", "sub/b.jsonl"],  # a folder skips _tmp/ and .hidden/
        "/*.jsonl": ["a.jsonl"],
        "/**/*.jsonl": ["_tmp/c.jsonl", "a.jsonl", "sub/b.jsonl"],  # a glob skips only .hidden/
        "/sub/b.jsonl": ["b.jsonl"],
        "/[as]*/*.jsonl": ["sub/b.jsonl"],  # keys start at the fixed prefix
    }[pattern]
    assert relative == expected
    assert documents("jsonl", f"{bucket}/corpus{pattern}") == documents(
        "jsonl", f"{tmp_path}/corpus{pattern}"
    )


def test_missing_buckets_and_objects_are_user_errors(bucket, jsonl_corpus, isolated):
    with pytest.raises(UserError, match="bucket lmjax-missing does not exist"):
        documents("jsonl", "gs://lmjax-missing/corpus/*.jsonl")
    with pytest.raises(UserError, match="matches no files"):
        cache.load_or_build(tiny(source="jsonl", path=f"{bucket}/nothing/*.jsonl"), log=lambda m: None)
    with pytest.raises(UserError, match="cannot write the token cache gs://lmjax-missing/cache"):
        cache.load_or_build(
            tiny(source="jsonl", path=jsonl_corpus, cache_dir="gs://lmjax-missing/cache"), log=lambda m: None
        )
    with pytest.raises(UserError, match=r"tokenizer_path=gs://lmjax-test/.*/t.model does not exist"):
        cache.cache_key(tiny(source="jsonl", path=jsonl_corpus, tokenizer_path=f"{bucket}/t.model"))
    with pytest.raises(UserError, match=r"local disk only.*gcloud storage cp -r"):
        cache.load_or_build(tiny(source="tfds", path=f"{bucket}/tfds/lines/1.0.0"), log=lambda m: None)


def test_a_token_cache_on_a_bucket_is_built_once_and_read_by_every_host(
    bucket, tmp_path, jsonl_corpus, isolated, gcs_server, monkeypatch
):
    cfg = tiny(source="jsonl", path=jsonl_corpus, cache_dir=f"{bucket}/cache")
    built, logged = load(cfg)
    assert any(m.startswith("tokenizing") for m in logged)
    key = cache.cache_key(cfg)
    assert str(built.entry) == f"{bucket}/cache/{key}" and built.entry.name == key
    meta = json.loads(storage.path(f"{bucket}/cache/{key}/meta.json").read_text())
    uploaded = gcs_server.names(f"{bucket.removeprefix('gs://lmjax-test/')}/cache/{key}/")
    build = meta["upload"]["build"]
    assert sorted(uploaded) == sorted(
        [f"{bucket.removeprefix('gs://lmjax-test/')}/cache/{key}/meta.json"]
        + [
            f"{bucket.removeprefix('gs://lmjax-test/')}/cache/{key}/{build}/{n}"
            for n in meta["upload"]["files"]
        ]
    )
    assert "tokenizer.model" in meta["upload"]["files"] and "c0/train-starts.npy" in meta["upload"]["files"]
    assert list((tmp_path / "cwd").iterdir()) == []  # no local "gs:" folder

    monkeypatch.setenv("LMJAX_MIRROR", str(tmp_path / "other-host"))
    again, logged = load(cfg)  # another host: copies the entry, does not tokenize
    assert not any(m.startswith("tokenizing") for m in logged)
    assert any(m.startswith(f"copying {len(meta['upload']['files'])} files") for m in logged)
    assert_same_corpus(again, built)
    _, logged = load(cfg)  # its mirror is complete now
    assert logged == []

    local, _ = load(tiny(source="jsonl", path=jsonl_corpus, cache_dir=str(tmp_path / "c")))
    assert local.entry.name == key
    assert_same_corpus(again, local)


def test_a_killed_upload_is_not_read_and_a_new_build_replaces_it(
    bucket, tmp_path, jsonl_corpus, isolated, gcs_server
):
    cfg = tiny(source="jsonl", path=jsonl_corpus, cache_dir=f"{bucket}/cache")
    entry = storage.path(f"{bucket}/cache/{cache.cache_key(cfg)}")
    (entry / "host-1-dead" / "tokenizer.model").write_bytes(b"half an upload")
    (entry / "host-1-dead" / "c0" / "train-00000.array_record").write_bytes(b"junk")
    corpus, logged = load(cfg)
    assert any(m.startswith("tokenizing") for m in logged)
    assert not (entry / "host-1-dead" / "tokenizer.model").exists()  # the winner removed it
    local, _ = load(tiny(source="jsonl", path=jsonl_corpus, cache_dir=str(tmp_path / "c")))
    assert_same_corpus(corpus, local)


def test_of_two_racing_uploads_the_first_meta_json_wins(bucket, tmp_path, jsonl_corpus, isolated):
    local_cfg = tiny(source="jsonl", path=jsonl_corpus, cache_dir=str(tmp_path / "c"))
    first, _ = load(local_cfg)
    second = tmp_path / "second"
    shutil.copytree(first.entry, second)
    (second / "tokenizer.model").write_bytes(b"the loser's bytes")  # tells the two uploads apart
    cfg = tiny(source="jsonl", path=jsonl_corpus, cache_dir=f"{bucket}/cache")
    entry = storage.path(f"{bucket}/cache/{cache.cache_key(cfg)}")
    assert cache.publish(first.entry, entry, "winner-1")
    assert not cache.publish(second, entry, "loser-2")
    assert not (entry / "loser-2").exists()  # the loser deleted its own upload
    assert json.loads((entry / "meta.json").read_text())["upload"]["build"] == "winner-1"
    corpus, logged = load(cfg)
    assert not any(m.startswith("tokenizing") for m in logged)
    assert_same_corpus(corpus, first)


def test_a_tokenizer_on_a_bucket_is_loaded_saved_and_keyed_by_content(bucket, tmp_path, jsonl_corpus):
    trained, _ = load(tiny(source="jsonl", path=jsonl_corpus, cache_dir=str(tmp_path / "c")))
    trained.tokenizer.save(f"{bucket}/t.model")
    trained.tokenizer.save(tmp_path / "t.model")
    loaded = tokenizer.Tokenizer.load(f"{bucket}/t.model")
    assert loaded.model_proto == trained.tokenizer.model_proto
    assert loaded.encode("line 3: word word\n") == trained.tokenizer.encode("line 3: word word\n")
    on_bucket = tiny(
        source="jsonl", path=jsonl_corpus, tokenizer_path=f"{bucket}/t.model", cache_dir=str(tmp_path / "c2")
    )
    on_disk = tiny(
        source="jsonl",
        path=jsonl_corpus,
        tokenizer_path=str(tmp_path / "t.model"),
        cache_dir=str(tmp_path / "c2"),
    )
    assert cache.cache_key(on_bucket) == cache.cache_key(on_disk)  # the same bytes
    corpus, _ = load(on_bucket)
    assert_same_corpus(corpus, trained)
    with pytest.raises(UserError, match="does not exist"):
        tokenizer.Tokenizer.load(f"{bucket}/missing.model")
