"""XLA flags: only when the user set none, only flags the installed jaxlib has, said aloud."""

import os

import pytest

from lmjax import xla_flags


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    return monkeypatch


def test_gpu_flags_are_set_when_jaxlib_has_them(clean_env):
    clean_env.setenv("JAX_PLATFORMS", "cuda")
    said = []
    flags = xla_flags.apply(log=said.append)
    assert flags and set(flags) <= set(xla_flags.CANDIDATES["gpu"])
    assert all(xla_flags.jaxlib_knows(f) for f in flags)
    assert os.environ["XLA_FLAGS"] == " ".join(flags)
    assert len(said) == 1 and said[0].startswith("XLA_FLAGS=")


def test_a_flag_this_jaxlib_lacks_is_never_set(clean_env):
    clean_env.setenv("JAX_PLATFORMS", "cuda")
    clean_env.setitem(xla_flags.CANDIDATES, "gpu", ("--xla_gpu_flag_that_never_existed_lmjax=true",))
    assert not xla_flags.jaxlib_knows("--xla_gpu_flag_that_never_existed_lmjax=true")
    assert xla_flags.apply(log=lambda m: None) == []
    assert "XLA_FLAGS" not in os.environ


def test_the_users_flags_win_and_cpu_gets_none(clean_env):
    clean_env.setenv("JAX_PLATFORMS", "cuda")
    clean_env.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert xla_flags.apply(log=lambda m: None) == []
    clean_env.delenv("XLA_FLAGS")
    clean_env.setenv("JAX_PLATFORMS", "cpu")
    assert xla_flags.expected_backend() == "cpu"
    assert xla_flags.apply(log=lambda m: None) == []
