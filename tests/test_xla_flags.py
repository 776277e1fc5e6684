"""XLA flags: only when the user set none, only flags a fresh jax process accepts, said aloud."""

import os
import subprocess
import sys

import pytest

from lmjax import xla_flags

REAL, BOGUS = "--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_flag_that_never_existed_lmjax=true"


@pytest.fixture
def clean_env(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    return monkeypatch


def test_only_flags_a_fresh_process_accepts_pass():
    assert xla_flags.accepted([REAL]) == [REAL]
    assert xla_flags.accepted([BOGUS]) == []  # it would abort the process at backend start
    assert xla_flags.accepted([BOGUS, REAL]) == [REAL]


def test_gpu_flags_are_set_and_said(clean_env):
    clean_env.setenv("JAX_PLATFORMS", "cuda")
    clean_env.setitem(xla_flags.CANDIDATES, "gpu", (REAL, BOGUS))
    said = []
    assert xla_flags.apply(log=said.append) == [REAL]
    assert os.environ["XLA_FLAGS"] == REAL
    assert len(said) == 1 and said[0].startswith(f"XLA_FLAGS={REAL}")


def test_the_users_flags_win_and_cpu_gets_none(clean_env):
    clean_env.setenv("JAX_PLATFORMS", "cuda")
    clean_env.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    assert xla_flags.apply(log=lambda m: None) == []
    clean_env.delenv("XLA_FLAGS")
    clean_env.setenv("JAX_PLATFORMS", "cpu")
    assert xla_flags.expected_backend() == "cpu"
    assert xla_flags.apply(log=lambda m: None) == []
    assert "XLA_FLAGS" not in os.environ


def test_flags_set_after_importing_jax_reach_the_backend(clean_env):
    """XLA reads XLA_FLAGS when the backend starts, not when jax is imported: modules import jax at
    the top, and `apply` (after those imports) still comes in time."""
    probe = f"import os, jax, lmjax.distributed; os.environ['XLA_FLAGS'] = {BOGUS!r}; jax.devices('cpu')"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120)
    assert done.returncode != 0 and BOGUS.encode() in done.stderr  # the flag reached XLA
