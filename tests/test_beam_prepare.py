"""The token cache built by an Apache Beam pipeline (prepare_beam.py, DirectRunner) equals the
in-process build file for file: a mixture of a JSONL folder and a Parquet folder, with shards
small enough that every split has several and their cuts fall inside input files; each worker
reads only its files; a bucket cache; the CLI's errors; and two training processes on the Beam
build against one on the in-process build."""

import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TINY_TRAIN_SETS, tiny_train_argv
from test_multihost import SETTINGS, STEPS, assert_close, losses, no_child_left, train_two  # noqa: F401

from lmjax import config, storage
from lmjax.config import UserError
from lmjax.data import cache, prepare_beam, shards, sources
from lmjax.data.__main__ import main as data_main
from lmjax.train import main as train_main

SHARD_BLOCKS = 2  # 16k-token shards: tens per split, cut inside the input files
TWO_WORKERS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]
JSONL_FILES, PARQUET_FILES, DOCS_PER_FILE = 6, 4, 16


def write_corpus(root: Path) -> None:
    """Standard library modules as documents: JSONL files in root/jsonl, Parquet in root/parquet
    (about 3.5 MB in all)."""
    modules = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    texts = [p.read_text(errors="replace") for p in modules[: (JSONL_FILES + PARQUET_FILES) * DOCS_PER_FILE]]
    per_file = [texts[k : k + DOCS_PER_FILE] for k in range(0, len(texts), DOCS_PER_FILE)]
    (root / "jsonl").mkdir(parents=True)
    (root / "parquet").mkdir()
    for k, docs in enumerate(per_file[:JSONL_FILES]):
        (root / "jsonl" / f"{k}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for k, docs in enumerate(per_file[JSONL_FILES:]):
        pq.write_table(pa.table({"text": docs}), root / "parquet" / f"{k}.parquet")


def data_sets(corpus: Path, cache_dir: str) -> list[str]:
    """The `--set`s of the data: a mixture of both folders, cached in `cache_dir`."""
    mixture = [
        {"source": "jsonl", "path": str(corpus / "jsonl")},
        {"source": "parquet", "path": str(corpus / "parquet"), "weight": 2.0},
    ]
    return [
        "data.source=mixture",
        f"data.mixture={json.dumps(mixture)}",
        "data.tokenizer_sample_bytes=300000",
        "data.validation_percent=10",
        f"data.cache_dir={cache_dir}",
    ]


def data_config(sets: list[str]) -> config.Data:
    """The data section a training run of tiny_train_argv(..., *sets) reads, so it finds the entry."""
    return config.apply_overrides(config.load_experiment("stdlib_tiny"), [*TINY_TRAIN_SETS, *sets]).data


def cli_sets(sets: list[str]) -> list[str]:
    """`--set` arguments of `python -m lmjax.data prepare --experiment stdlib_tiny` for data_config(sets)."""
    return [a for s in (*TINY_TRAIN_SETS, *sets) for a in ("--set", s)]


def entry_files(entry: Path) -> dict[str, bytes]:
    return {p.relative_to(entry).as_posix(): p.read_bytes() for p in sorted(entry.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """The corpus built in-process and by Beam (DirectRunner, 2 worker processes), both with
    SHARD_BLOCKS blocks a shard."""
    root = tmp_path_factory.mktemp("beam")
    write_corpus(root / "corpus")
    in_process_sets = data_sets(root / "corpus", str(root / "in_process"))
    beam_sets = data_sets(root / "corpus", str(root / "beam"))
    logs: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(shards, "SHARD_BLOCKS", SHARD_BLOCKS)
        in_process = cache.load_or_build(data_config(in_process_sets), log=logs.append)
        built = prepare_beam.run(data_config(beam_sets), TWO_WORKERS, logs.append)
    by_beam = cache.load_or_build(data_config(beam_sets), log=logs.append)
    return dict(
        root=root,
        in_process=in_process,
        by_beam=by_beam,
        built=built,
        in_process_sets=in_process_sets,
        beam_sets=beam_sets,
        logs=logs,
    )


def test_beam_builds_the_files_of_the_in_process_build(builds):
    a, b = builds["in_process"], builds["by_beam"]
    assert b.entry == builds["built"].entry and b.entry != a.entry
    files_a, files_b = entry_files(Path(a.entry)), entry_files(Path(b.entry))
    assert sorted(files_a) == sorted(files_b)
    different = [n for n in files_a if files_a[n] != files_b[n]]
    assert different == ["meta.json"]
    meta_a, meta_b = json.loads(files_a["meta.json"]), json.loads(files_b["meta.json"])
    assert meta_b["build"]["runner"] == "DirectRunner"
    assert meta_b["build"]["chars"] == meta_a["build"]["chars"]
    del meta_a["build"], meta_b["build"]
    assert meta_a == meta_b  # parts, summary, identity, shard_blocks, every file's record
    assert a.identity == b.identity and meta_a["parts"] == meta_b["parts"]
    for part in meta_b["parts"]:
        for split in cache.SPLITS:
            assert len(part[split]["shards"]) >= 3, (split, part[split]["tokens"])
    # shard cuts fall inside input files: a shard boundary that is no document start
    shard_tokens = shards.BLOCK_TOKENS * SHARD_BLOCKS
    train = b.splits("train")[0]
    assert set(range(shard_tokens, len(train), shard_tokens)) - set(np.asarray(train.starts).tolist())
    idx = np.arange(len(train)).reshape(1, -1)
    np.testing.assert_array_equal(a.splits("train")[0].take(idx), train.take(idx))


def test_each_worker_reads_only_its_share_and_no_file_twice(builds):
    built = builds["built"]
    cfg = data_config(builds["beam_sets"])
    chunks = [chunk for c in cfg.components() for chunk in sources.chunks(c, cfg.validation_percent)]
    corpus_bytes = sum(chunk.size for chunk in chunks)
    assert corpus_bytes == sum(p.stat().st_size for p in (builds["root"] / "corpus").rglob("*.*"))
    assert len(chunks) == JSONL_FILES + PARQUET_FILES
    assert built.input_bytes == corpus_bytes and built.chunks_read == len(chunks)
    assert len(built.worker_bytes) == 2 and sum(built.worker_bytes.values()) == corpus_bytes
    assert all(0 < n < corpus_bytes for n in built.worker_bytes.values()), built.worker_bytes


def test_an_existing_entry_is_reused(builds):
    logs = []
    built = prepare_beam.run(data_config(builds["beam_sets"]), [], logs.append)
    assert built.entry == builds["by_beam"].entry and built.worker_bytes == {}
    assert logs == [f"the token cache entry {built.entry} exists; using it"]


def test_a_bucket_cache_built_by_beam_equals_the_local_one(builds, bucket, monkeypatch):
    monkeypatch.setattr(shards, "SHARD_BLOCKS", SHARD_BLOCKS)
    cfg = data_config(data_sets(builds["root"] / "corpus", f"{bucket}/cache"))
    built = prepare_beam.run(cfg, [], lambda m: None)
    corpus = cache.load_or_build(cfg, log=lambda m: None)
    assert corpus.entry == built.entry and storage.is_bucket(built.entry)
    meta = json.loads((built.entry / "meta.json").read_text())
    upload = built.entry / meta["upload"]["build"]
    assert not (upload / "meta.json").exists()  # only entry/meta.json names the build
    assert sorted(meta["upload"]["files"]) == sorted(meta["files"])
    local = Path(builds["in_process"].entry)
    for name in meta["files"]:
        assert (upload / name).read_bytes() == (local / name).read_bytes(), name
    assert corpus.identity == builds["in_process"].identity


def test_a_corpus_with_an_empty_split_is_the_in_process_user_error_and_leaves_no_entry(tmp_path):
    (tmp_path / "corpus").mkdir()
    lines = [json.dumps({"text": f"document {i} " * 40}) for i in range(4)]
    (tmp_path / "corpus" / "a.jsonl").write_text("\n".join(lines) + "\n")
    sets = ["data.source=jsonl", f"data.path={tmp_path / 'corpus'}", "data.validation_percent=0.01"]
    sets.append("data.vocab_size=284")  # the bytes, control and chat pieces and a few merges
    with pytest.raises(UserError) as in_process:
        cache.load_or_build(data_config([*sets, f"data.cache_dir={tmp_path / 'a'}"]), log=lambda m: None)
    cfg = data_config([*sets, f"data.cache_dir={tmp_path / 'b'}"])
    with pytest.raises(UserError) as by_beam:
        prepare_beam.run(cfg, [], lambda m: None)
    assert str(by_beam.value) == str(in_process.value)
    assert "has no validation text" in str(by_beam.value)
    assert list((tmp_path / "b").iterdir()) == []  # neither the entry nor the temporary folder


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--experiment", "no_such_experiment", "--runner", "DirectRunner"], "no_such_experiment"),
        (["--runner", "NoSuchRunner"], "--runner NoSuchRunner is not a Beam runner"),
        (["--direct_num_workers", "many"], "bad Beam pipeline option: argument --direct_num_workers"),
        (["--no_such_flag", "1"], "--no_such_flag is neither an option of `prepare` nor a Beam"),
    ],
)
def test_the_cli_stops_with_one_line(builds, capsys, args, expected):
    sets = cli_sets(builds["beam_sets"])
    experiment = [] if "--experiment" in args else ["--experiment", "stdlib_tiny"]
    assert data_main(["prepare", *experiment, *args, *sets]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmjax: error: ") and expected in err[0], err


def test_the_cli_without_apache_beam_names_the_extra(builds, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "apache_beam", None)  # how Python marks a module unimportable
    sets = cli_sets(builds["beam_sets"])
    assert data_main(["prepare", "--experiment", "stdlib_tiny", "--runner", "DirectRunner", *sets]) == 2
    assert "pip install 'lmjax[beam]'" in capsys.readouterr().err


def test_the_cli_prints_the_summary_of_the_beam_entry(builds, capsys):
    sets = cli_sets(builds["beam_sets"])
    assert data_main(["prepare", "--experiment", "stdlib_tiny", "--runner", "DirectRunner", *sets]) == 0
    out, err = capsys.readouterr()
    assert f"the token cache entry {builds['by_beam'].entry} exists; using it" in err
    part = builds["by_beam"].meta["parts"][1]["validation"]
    assert out.startswith(f"{builds['by_beam'].entry}: ")
    assert f"validation: {part['documents']} documents, {part['tokens']:,} tokens" in out


@pytest.mark.slow
def test_two_processes_train_on_the_beam_build_like_one_on_the_in_process_build(builds, tmp_path):
    one = tmp_path / "one"
    assert train_main(tiny_train_argv(one, *SETTINGS, *builds["in_process_sets"])) == 0
    two = tmp_path / "two"
    errs = train_two(two, *builds["beam_sets"])
    assert not any("tokenizing" in e for e in errs), errs  # read the Beam build, built nothing
    assert_close(losses(two), losses(one), range(1, STEPS + 1))
