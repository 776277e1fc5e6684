"""`lmjax_stdlib`: this Python's standard library `.py` files as a TFDS dataset.

The same files, text and split as the `stdlib` source (tests and idlelib left out, 2% of files
to validation by a hash of their relative path), prepared by TFDS in array_record format. It
needs neither TensorFlow nor the network: nothing is downloaded. Importing this module imports
tensorflow_datasets and registers the builder; `tfds_source` imports it only when asked for it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from lmjax.data.files import is_validation, stdlib_files

VALIDATION_PERCENT = 2.0


class LmjaxStdlib(tfds.core.GeneratorBasedBuilder):
    """One example per standard library file: {"text": its source, "path": its relative path}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    # One config per Python minor version: each has its own standard library, and the default
    # data dir (~/tensorflow_datasets) is shared by every Python on the machine.
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name=f"py{sys.version_info.major}{sys.version_info.minor}",
            description=f"Python {sys.version_info.major}.{sys.version_info.minor} standard library",
        )
    ]

    def _info(self) -> tfds.core.DatasetInfo:
        # Not dataset_info_from_configs(): that reads metadata files from the builder's package
        # folder, which lmjax does not ship.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "path": tfds.features.Text()}),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root, files = stdlib_files()
        rel = [p.relative_to(root).as_posix() for p in files]
        valid = [r for r in rel if is_validation(r, VALIDATION_PERCENT)]
        train = [r for r in rel if not is_validation(r, VALIDATION_PERCENT)]
        return {
            "train": self._generate_examples(root, train),
            "validation": self._generate_examples(root, valid),
        }

    def _generate_examples(self, root: Path, relative_paths: list[str]) -> Iterator[tuple[str, dict]]:
        for rel in relative_paths:
            yield rel, {"text": (root / rel).read_bytes().decode("utf-8", errors="replace"), "path": rel}
