"""The TFDS source without TensorFlow: lmjax_stdlib prepared once, a train-only builder, fast errors."""

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from lmjax.config import UserError  # noqa: E402
from lmjax.data import tfds_source  # noqa: E402
from lmjax.data.files import is_validation, stdlib_files  # noqa: E402

LINES = 300  # examples in the test builder; every 10th is empty


def line_text(i: int) -> bytes:
    if i % 10 == 0:
        return b""
    return b"bad utf-8: \xff\n" if i == 7 else f"line {i}: {'x' * (i % 13)}\n".encode()


class LmjaxTestLines(tfds.core.GeneratorBasedBuilder):
    """Only a 'train' split, and the text in a feature called 'body'."""

    VERSION = tfds.core.Version("0.1.0")

    def _info(self):
        features = {"body": tfds.features.Text(), "n": tfds.features.Scalar(dtype=np.int64)}
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(LINES):
            yield i, {"body": line_text(i), "n": i}


@pytest.fixture(scope="module")
def stdlib_dir(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """lmjax_stdlib prepared by name into an empty data dir: (data dir, documents)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, list(tfds_source.documents("lmjax_stdlib", str(data_dir), "text", 2.0))


@pytest.fixture(scope="module")
def lines_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("tfds_lines")
    LmjaxTestLines(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return data_dir


def test_stdlib_by_name_is_the_standard_library(stdlib_dir):
    data_dir, docs = stdlib_dir
    root, files = stdlib_files()
    expected = {"train": [], "validation": []}
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace")
        if text:
            split = "validation" if is_validation(p.relative_to(root).as_posix(), 2.0) else "train"
            expected[split].append(text)
    got = {s: [t for split, t in docs if split == s] for s in ("train", "validation")}
    # Every non-empty file, byte for byte, in its split (TFDS stores them in its own order).
    assert sorted(got["train"]) == sorted(expected["train"])
    assert sorted(got["validation"]) == sorted(expected["validation"])
    assert (root / "os.py").read_text(errors="replace") in got["train"] + got["validation"]
    assert 0.005 < len(got["validation"]) / len(files) < 0.04, len(got["validation"])
    # Prepared once: the second read only reads (no file written or replaced), same order.
    prepared = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    assert list(tfds_source.documents("lmjax_stdlib", str(data_dir), "text", 2.0)) == docs
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == prepared


def test_prepared_folder_through_path(stdlib_dir):
    data_dir, docs = stdlib_dir
    (version_dir,) = data_dir.glob("lmjax_stdlib/*/1.0.0")
    assert (version_dir / "dataset_info.json").is_file()
    # builder_from_directory: no name needed, no builder code involved.
    assert list(tfds_source.documents("", str(version_dir), "text", 2.0)) == docs
    assert tfds_source.fingerprint("", str(version_dir), "text") == tfds_source.fingerprint(
        "lmjax_stdlib", str(data_dir), "text"
    )


def test_train_only_dataset_splits_by_hash(lines_dir):
    docs = list(tfds_source.documents("lmjax_test_lines", str(lines_dir), "body", 30.0))
    texts = [line_text(i).decode("utf-8", errors="replace") for i in range(LINES)]
    assert sorted(t for _, t in docs) == sorted(t for t in texts if t)  # empty ones skipped
    assert "bad utf-8: \ufffd\n" in [t for _, t in docs]
    counts = Counter(s for s, _ in docs)
    assert counts["train"] + counts["validation"] == LINES - LINES // 10
    assert 0.15 < counts["validation"] / len(docs) < 0.45, counts
    # Deterministic, the same through the prepared folder, and the percent moves the split.
    assert list(tfds_source.documents("lmjax_test_lines", str(lines_dir), "body", 30.0)) == docs
    (version_dir,) = lines_dir.glob("lmjax_test_lines/0.1.0")
    assert list(tfds_source.documents("", str(version_dir), "body", 30.0)) == docs
    assert {s for s, _ in tfds_source.documents("lmjax_test_lines", str(lines_dir), "body", 0.0)} == {"train"}
    assert {s for s, _ in tfds_source.documents("lmjax_test_lines", str(lines_dir), "body", 100.0)} == {
        "validation"
    }


def test_missing_field_names_the_features(lines_dir):
    with pytest.raises(UserError, match=r"no feature 'text'.*\['body', 'n'\]"):
        next(tfds_source.documents("lmjax_test_lines", str(lines_dir), "text", 2.0))
    with pytest.raises(UserError, match="'n'.*is not text"):
        next(tfds_source.documents("lmjax_test_lines", str(lines_dir), "n", 2.0))


def test_unknown_dataset_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match="unknown TFDS dataset 'no_such_dataset_xyz'") as e:
        next(tfds_source.documents("no_such_dataset_xyz", str(tmp_path), "text", 2.0))
    assert time.perf_counter() - start < 3
    assert "\n" not in str(e.value)


def test_registry_dataset_offline_fails_fast(tmp_path):
    if tfds_source._installed("tensorflow") and tfds_source._online():
        pytest.skip("online with TensorFlow: this would download tiny_shakespeare for real")
    start = time.perf_counter()
    with pytest.raises(UserError, match="tiny_shakespeare") as e:
        next(tfds_source.documents("tiny_shakespeare", str(tmp_path), "text", 2.0))
    assert time.perf_counter() - start < 10
    assert "network" in str(e.value) or "TensorFlow" in str(e.value)
    assert "file_format='array_record'" in str(e.value) and "\n" not in str(e.value)


def test_registry_dataset_online_without_tensorflow(tmp_path, monkeypatch):
    if tfds_source._installed("tensorflow"):
        pytest.skip("TensorFlow is installed")
    monkeypatch.setattr(tfds_source, "_online", lambda: True)
    with pytest.raises(UserError, match="'lm1b'.*needs TensorFlow") as e:
        next(tfds_source.documents("lm1b", str(tmp_path), "text", 2.0))
    assert "network" not in str(e.value)
    assert not any(tmp_path.rglob("*.array_record*"))  # nothing downloaded or prepared


def test_fingerprint_stable_and_distinct(stdlib_dir, lines_dir):
    data_dir, _ = stdlib_dir
    a = tfds_source.fingerprint("lmjax_stdlib", str(data_dir), "text")
    assert a == tfds_source.fingerprint("lmjax_stdlib", str(data_dir), "text")
    assert len(a) == 16 and int(a, 16) >= 0
    b = tfds_source.fingerprint("lmjax_test_lines", str(lines_dir), "body")
    assert a != b
    assert tfds_source.fingerprint("lmjax_stdlib", str(data_dir), "path") != a


@pytest.mark.parametrize("module", ["tensorflow_datasets", "importlib_resources", "array_record"])
def test_missing_library_names_the_extra(module, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(UserError, match=r"pip install 'lmjax\[tfds\]'"):
        tfds_source.fingerprint("lmjax_stdlib", "", "text")
