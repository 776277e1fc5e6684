"""A damaged token-cache entry is never read: a local one is deleted and rebuilt with one log
line, a damaged file of a bucket entry's mirror is copied again, and a damaged bucket entry is a
UserError naming it. Entries written before meta.json recorded sizes and checksums still load."""

import json
import random
import re
import shutil
import string
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lmjax import storage
from lmjax.config import Data, UserError
from lmjax.data import cache

SHARD = "c0/train-00000.array_record"
STARTS = "c0/train-starts.npy"
LETTERS = string.ascii_letters + string.digits + " \n"  # random text: about one token a letter


class Reference:
    """A corpus config (without a cache_dir) and its corpus, built once."""

    def __init__(self, data: Data, corpus: cache.Corpus):
        self.data, self.corpus = data, corpus


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    """A corpus whose train shard spans several 64 KiB blocks (so its first and last block are
    not all of it), built once in a cache folder the tests copy and never damage."""
    folder = tmp_path_factory.mktemp("damage")
    rng = random.Random(0)
    docs = ["".join(rng.choices(LETTERS, k=rng.randint(100, 900))) for _ in range(400)]
    (folder / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = Data(source="jsonl", path=str(folder / "a.jsonl"), vocab_size=400)
    corpus = cache.load_or_build(replace(data, cache_dir=str(folder / "cache")), log=lambda m: None)
    assert (corpus.entry / SHARD).stat().st_size > 2 * (64 << 10)
    return Reference(data, corpus)


def copied_cache(reference: Reference, folder: Path) -> Data:
    """The reference cache copied to `folder`, and the corpus config that finds it there."""
    shutil.copytree(reference.corpus.entry.parent, folder)
    return replace(reference.data, cache_dir=str(folder))


def load(data: Data) -> tuple[cache.Corpus, list[str]]:
    logged: list[str] = []
    return cache.load_or_build(data, log=logged.append, progress=False), logged


def assert_same_corpus(a: cache.Corpus, b: cache.Corpus) -> None:
    assert a.identity == b.identity
    assert a.tokenizer.model_proto == b.tokenizer.model_proto
    assert a.meta["parts"] == b.meta["parts"]
    for x, y in zip(a.parts[0].values(), b.parts[0].values(), strict=True):
        np.testing.assert_array_equal(x.take(np.arange(len(x))), y.take(np.arange(len(y))))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, n_bytes: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:-n_bytes])


def drop_key(path: Path, key: str) -> None:
    meta = json.loads(path.read_text())
    del meta[key]
    path.write_text(json.dumps(meta))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "shard-deleted": (SHARD, Path.unlink),
    "shard-truncated": (SHARD, truncate),
    "shard-head-changed": (SHARD, lambda p: flip_byte(p, 100)),
    "shard-tail-changed": (SHARD, lambda p: flip_byte(p, p.stat().st_size - 100)),
    "starts-deleted": (STARTS, Path.unlink),
    "starts-truncated": (STARTS, lambda p: truncate(p, 8)),
    "starts-changed": (STARTS, lambda p: flip_byte(p, p.stat().st_size - 3)),
    "tokenizer-changed": ("tokenizer.model", lambda p: flip_byte(p, p.stat().st_size // 2)),
    "tokenizer-garbage": ("tokenizer.model", lambda p: p.write_bytes(b"not a model")),
    "meta-not-json": ("meta.json", lambda p: p.write_text('{"format": 2, "dty')),
    "meta-without-parts": ("meta.json", lambda p: drop_key(p, "parts")),
    "meta-deleted": ("meta.json", Path.unlink),
}


def assert_rebuilt(logged: list[str], entry: Path, name: str) -> None:
    """One line says what is damaged and that the entry is deleted; then the build's own line."""
    damaged = [m for m in logged if "damaged" in m]
    assert len(damaged) == 1 and "\n" not in damaged[0]
    assert re.fullmatch(
        rf"token cache entry {re.escape(str(entry))} is damaged \({re.escape(name)}: .+\); "
        "deleting it and rebuilding",
        damaged[0],
    )
    assert [m.split()[0] for m in logged] == ["token", "tokenized"]
    assert [p.name for p in entry.parent.iterdir() if "damaged" in p.name] == []


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_local_entry_is_deleted_and_rebuilt(reference, tmp_path, kind):
    data = copied_cache(reference, tmp_path / "cache")
    name, damage = DAMAGE[kind]
    entry = cache.entry_path(data)
    damage(entry / name)
    corpus, logged = load(data)
    assert_rebuilt(logged, entry, name)
    assert_same_corpus(corpus, reference.corpus)
    assert load(data)[1] == []  # the rebuilt entry is whole


def without_records(entry: Path) -> None:
    """Make `entry` look written before meta.json recorded sizes and checksums."""
    drop_key(entry / "meta.json", "files")


def test_an_entry_without_size_and_checksum_records_loads_without_rebuilding(reference, tmp_path):
    data = copied_cache(reference, tmp_path / "cache")
    entry = cache.entry_path(data)
    without_records(entry)
    before = (entry / "meta.json").read_bytes()
    corpus, logged = load(data)
    assert logged == []
    assert (entry / "meta.json").read_bytes() == before
    assert_same_corpus(corpus, reference.corpus)


@pytest.mark.parametrize(
    "kind", ["shard-deleted", "shard-truncated", "starts-truncated", "tokenizer-garbage", "meta-not-json"]
)
def test_an_entry_without_records_whose_file_is_missing_or_unparseable_is_rebuilt(reference, tmp_path, kind):
    data = copied_cache(reference, tmp_path / "cache")
    entry = cache.entry_path(data)
    without_records(entry)
    name, damage = DAMAGE[kind]
    damage(entry / name)
    corpus, logged = load(data)
    assert_rebuilt(logged, entry, name)
    assert_same_corpus(corpus, reference.corpus)


def test_a_whole_entry_found_damaged_earlier_is_not_deleted(reference, tmp_path):
    """What a process that lost the race to rebuild finds: the entry whole again."""
    data = copied_cache(reference, tmp_path / "cache")
    logged: list[str] = []
    cache._remove_if_damaged(data, cache.entry_path(data), logged.append)
    assert logged == []
    assert load(data)[1] == []


def drop_key_on_bucket(entry: storage.Path, key: str) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    del meta[key]
    (entry / "meta.json").write_text(json.dumps(meta))


@pytest.fixture
def on_bucket(reference, bucket, tmp_path, monkeypatch) -> tuple[Data, storage.Path]:
    """The reference entry published to the test's bucket folder, read through a mirror of the
    test's own: (its corpus config, the entry on the bucket)."""
    monkeypatch.setenv("LMJAX_MIRROR", str(tmp_path / "mirror"))
    data = replace(reference.data, cache_dir=f"{bucket}/cache")
    entry = cache.entry_path(data)
    assert cache.publish(reference.corpus.entry, entry, "b1")
    return data, entry


@pytest.mark.parametrize(
    "kind", ["shard-deleted", "shard-truncated", "shard-head-changed", "starts-changed", "tokenizer-changed"]
)
def test_a_damaged_file_of_the_mirror_is_copied_again(reference, on_bucket, kind):
    data, entry = on_bucket
    mirror = cache.mirror_path(entry) / "b1"
    assert load(data)[1] == [f"copying {len(reference.corpus.meta['files'])} files of {entry} to {mirror}"]
    name, damage = DAMAGE[kind]
    damage(mirror / name)
    corpus, logged = load(data)
    assert len(logged) == 1 and logged[0].startswith(f"copying 1 files of {entry}")
    assert ("damaged, such as " + name in logged[0]) == (kind != "shard-deleted")
    assert_same_corpus(corpus, reference.corpus)
    assert load(data)[1] == []


def test_a_mirror_file_that_does_not_parse_is_copied_again_without_records(reference, on_bucket):
    data, entry = on_bucket
    drop_key_on_bucket(entry, "files")
    load(data)
    model = cache.mirror_path(entry) / "b1" / "tokenizer.model"
    model.write_bytes(b"x" * model.stat().st_size)  # its size is all a meta.json without records gives
    corpus, logged = load(data)
    assert len(logged) == 2 and "tokenizer.model" in logged[0] and logged[1].startswith("copying 1 files")
    assert_same_corpus(corpus, reference.corpus)


def damage_on_bucket(entry: storage.Path, kind: str, tmp_path: Path) -> None:
    """Damage `kind` done to the bucket's copy of a file, through a local copy."""
    name, damage = DAMAGE[kind]
    remote = entry / ("meta.json" if name == "meta.json" else f"b1/{name}")
    local = tmp_path / "object"
    local.write_bytes(remote.read_bytes())
    damage(local)
    if local.exists():
        remote.write_bytes(local.read_bytes())
    else:
        remote.unlink()


@pytest.mark.parametrize(
    "kind",
    ["shard-deleted", "shard-truncated", "shard-tail-changed", "starts-truncated", "tokenizer-changed"]
    + ["meta-not-json", "meta-without-parts"],
)
def test_a_damaged_bucket_entry_is_a_user_error_naming_it(on_bucket, tmp_path, kind):
    data, entry = on_bucket
    damage_on_bucket(entry, kind, tmp_path)
    with pytest.raises(UserError) as raised:
        load(data)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"the token cache entry {entry} is damaged (")
    assert f"({'' if kind.startswith('meta') else 'b1/'}{DAMAGE[kind][0]}: " in message
    assert f"delete it (gcloud storage rm -r {entry})" in message


def test_a_bucket_entry_without_records_whose_file_does_not_parse_is_a_user_error(on_bucket):
    data, entry = on_bucket
    drop_key_on_bucket(entry, "files")
    model = entry / "b1" / "tokenizer.model"
    model.write_bytes(b"x" * len(model.read_bytes()))
    with pytest.raises(UserError, match=rf"entry {re.escape(str(entry))} is damaged \(tokenizer.model: "):
        load(data)
