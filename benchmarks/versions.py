"""Installed package versions for a benchmark record, without importing JAX (a data benchmark
must not load it: the token cache build picks its worker pool by whether JAX runs)."""

from __future__ import annotations

from collections.abc import Iterable
from importlib import metadata


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Each package's installed version, None where it is not installed."""

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    return {p: version(p) for p in packages}
