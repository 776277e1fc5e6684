"""8 emulated CPU devices, a shared compilation cache, one tokenized corpus per session."""

import json
import os
import tempfile
from pathlib import Path

# A persistent compilation cache shared by this process and the subprocesses tests start.
CACHE = Path(
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "lmjax-jax-cache"))
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("LMJAX_CACHE", str(Path(tempfile.gettempdir()) / "lmjax-test-data"))
os.environ.setdefault("LMJAX_MIRROR", str(Path(tempfile.gettempdir()) / "lmjax-test-mirror"))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_compilation_cache_dir", str(CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

from lmjax import config  # noqa: E402
from lmjax.data import cache, loader  # noqa: E402

# Small enough that the whole suite stays in minutes on 2 cores, big enough to be a transformer.
TINY_DATA = config.Data(source="stdlib", vocab_size=512, tokenizer_sample_bytes=1_000_000)


def tiny_experiment(flavour: str = "gpt2", *overrides: str) -> config.Experiment:
    model = config.Model(
        flavour=flavour,
        vocab_size=256,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if flavour == "llama" else 0,
        d_ff=64,
        seq_len=32,
        dtype="float32",
        param_dtype="float32",
    )
    exp = config.Experiment(
        name="tiny",
        model=model,
        data=TINY_DATA,
        optim=config.Optim(lr=1e-2, warmup_steps=2),
        train=config.Train(steps=4, batch_size=8, progress=False),
        mesh=config.Mesh(data=1, fsdp=1, tensor=1),
    )
    return config.apply_overrides(exp, list(overrides))


# `--set`s that make stdlib_tiny a one-layer model on the session's corpus (its vocabulary and
# tokenizer sample, so the token cache is reused): seconds rather than minutes.
TINY_TRAIN_SETS = (
    f"data.vocab_size={TINY_DATA.vocab_size}",
    f"data.tokenizer_sample_bytes={TINY_DATA.tokenizer_sample_bytes}",
    "model.d_model=32",
    "model.n_heads=4",
    "model.n_layers=1",
    "model.seq_len=32",
    "train.batch_size=8",
    "train.eval_batches=1",
    "train.progress=false",
)


def tiny_train_argv(workdir: Path, *sets: str) -> list[str]:
    """`python -m lmjax.train` arguments for a one-layer stdlib_tiny on the session's corpus."""
    overrides = [a for s in (*TINY_TRAIN_SETS, *sets) for a in ("--set", s)]
    return ["--experiment", "stdlib_tiny", "--workdir", str(workdir), *overrides]


def metrics_of(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def synthetic_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens in documents of random lengths, through the real window code."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 3 * seq_len, 200)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    split = cache.Split(rng.integers(3, vocab, lengths.sum()).astype(np.uint16), starts)
    return loader.windows(split, rng.integers(0, lengths.sum() - seq_len - 1, batch_size), seq_len)


def two_corpora(
    folder: Path, weights: tuple[float, float], files: int, text: str
) -> tuple[config.Source, ...]:
    """Folders a/ (words "alpha") and b/ (words "omega") of `files` files each, as a mixture;
    `text` is a format string of {word} and {i}."""
    for name, word in (("a", "alpha"), ("b", "omega")):
        (folder / name).mkdir()
        for i in range(files):
            (folder / name / f"{i}.txt").write_text(text.format(word=word, i=i))
    return tuple(
        config.Source("files", str(folder / n), weight=w) for n, w in zip("ab", weights, strict=True)
    )


@pytest.fixture(scope="session")
def stdlib_corpus() -> cache.Corpus:
    return cache.load_or_build(TINY_DATA, log=lambda m: None)


@pytest.fixture(scope="session")
def short_run(tmp_path_factory) -> Path:
    """A finished 8-step stdlib run, evaluated on its whole validation split at the end: for
    the tests of what reads a run (evaluation, generation)."""
    from lmjax import train

    workdir = tmp_path_factory.mktemp("short_run")
    assert train.main(tiny_train_argv(workdir, "train.steps=8", "train.eval_batches=0")) == 0
    return workdir


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS server (fake-gcs-server) on 127.0.0.1 for the session; see tests/gcs.py."""
    import gcs

    server = gcs.Server()
    server.create_bucket("lmjax-test")
    yield server
    server.stop()


@pytest.fixture
def bucket(gcs_server, request) -> str:
    """A folder of its own on the test bucket for each test: "gs://lmjax-test/<test name>"."""
    return f"gs://lmjax-test/{request.node.name.replace('[', '-').strip(']')}"
