"""One run over several processes (hosts): JAX's multi-process runtime, started from the
environment, so the same command runs on one host or many.

`initialize` starts it when the environment names several processes:

  explicit    LMJAX_COORDINATOR=host:port, LMJAX_NUM_PROCESSES=N, LMJAX_PROCESS_ID=i (or JAX's
              JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), all three or none
  SLURM       a step started by `srun` with more than one task (SLURM_NTASKS > 1)
  TPU pod     a Cloud TPU VM whose slice has more than one worker (JAX reads the VM's metadata)

and does nothing on one process. Call it before anything touches the devices.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Mapping
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmjax.config import UserError

T = TypeVar("T")

# (lmjax's name, JAX's name) of each explicit setting.
EXPLICIT = (
    ("LMJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    ("LMJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    ("LMJAX_PROCESS_ID", "JAX_PROCESS_ID"),
)
# What `srun` sets in each task: JAX's own SLURM detection needs all of them.
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")

# How long a process waits for another's word (process 0 building the token cache may take
# hours on a large corpus); a process that dies ends the wait sooner, through the heartbeat.
WAIT_S = 24 * 3600
# How long a process waits for others that should answer at once, unless they are busy elsewhere
# (set from the heartbeat timeout by `initialize`).
prompt_answer_s = 60.0
# Exchanges through the coordinator are numbered: every process makes them in the same order.
_exchanges = itertools.count()


def detect(environ: Mapping[str, str] | None = None) -> dict | None:
    """`jax.distributed.initialize` arguments for this environment (None: one process).
    Raises UserError for an explicit setting given only in part, or not a number."""
    environ = os.environ if environ is None else environ
    given = {ours: environ.get(ours) or environ.get(theirs) for ours, theirs in EXPLICIT}
    if any(given.values()):
        missing = [f"{ours} (or {theirs})" for ours, theirs in EXPLICIT if not given[ours]]
        if missing:
            raise UserError(
                f"several processes need all three of {', '.join(o for o, _ in EXPLICIT)}; not set: "
                f"{', '.join(missing)}. Set them, or unset the others to run one process"
            )
        count, index = _ints(given["LMJAX_NUM_PROCESSES"], given["LMJAX_PROCESS_ID"])
        if count == 1:
            return None
        coordinator = given["LMJAX_COORDINATOR"]
        return {"coordinator_address": coordinator, "num_processes": count, "process_id": index}
    if all(k in environ for k in SLURM) and int(environ["SLURM_NTASKS"]) > 1:
        return {}  # JAX reads the coordinator, process count and index from SLURM's variables
    if _tpu_workers() > 1:
        return {}  # and from the TPU VM's metadata
    return None


def initialize(heartbeat_timeout_s: int, log: Callable[[str], None] = print) -> None:
    """Start JAX's multi-process runtime if the environment asks for it (see `detect`).

    A process that stops sending heartbeats for `heartbeat_timeout_s` seconds (killed, or its
    host lost) is declared dead and the others end, instead of waiting in a collective."""
    args = detect()
    if args is None:
        return
    if jax.distributed.is_initialized():  # by the caller (a notebook, another entry point)
        return
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU arrays across processes
    global prompt_answer_s
    prompt_answer_s = max(10.0, 2.0 * heartbeat_timeout_s)
    jax.distributed.initialize(
        **args,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        # A process that ends (a success, or an error) waits at most this long for the others.
        shutdown_timeout_seconds=heartbeat_timeout_s,
    )
    if jax.process_index() == 0:
        log(
            f"{jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} per process); heartbeat timeout {heartbeat_timeout_s} s"
        )


def main_first(work: Callable[[], T], what: str) -> T:
    """`work()` on process 0 first, then on the others (which then find what it wrote to a
    shared file system, e.g. the token cache, instead of all building it at once)."""
    client = _client()
    if client is None:
        return work()
    key = f"lmjax/{next(_exchanges)}/{what}"
    if jax.process_index() == 0:
        result = work()
        client.key_value_set(key, "1")
        return result
    client.blocking_key_value_get(key, WAIT_S * 1000)
    return work()


def agree(what: str, value: str, timeout_s: float = WAIT_S) -> list[str]:
    """Every process's `value` for `what`, in process order, exchanged through the
    coordinator (no device collective, so it cannot meet another process's step). A process
    that has not given its value within `timeout_s` raises (jax's DEADLINE_EXCEEDED)."""
    client = _client()
    if client is None:
        return [value]
    prefix = f"lmjax/{next(_exchanges)}/{what}"  # a new key each time: keys are set once
    client.key_value_set(f"{prefix}/{jax.process_index()}", value)
    ms = int(timeout_s * 1000)
    return [client.blocking_key_value_get(f"{prefix}/{i}", ms) for i in range(jax.process_count())]


def require_same(what: str, value: str, fix: str) -> None:
    """UserError on every process (so all exit 2 together) when `value` differs between them."""
    values = agree(what, value)
    for i, other in enumerate(values):
        if other != values[0]:
            raise UserError(
                f"{what} differs between processes: {values[0]} on process 0, {other} on process {i}; {fix}"
            )


class StopVote:
    """Whether every process stops after step `done`. All must stop (and save) at the same
    step, or the others would wait forever in the next step's collectives, yet a signal may
    reach only some. One process: a signal here, read at each call. Several: whether any
    process had a request one step earlier, from a vote that runs on the devices behind each
    step and is read a step late, so the host never waits on it (a blocking all-gather every
    step would leave the devices idle between steps)."""

    def __init__(self, mesh: jax.sharding.Mesh):
        self._several = jax.process_count() > 1
        self._step, self._decision = -1, False
        self._pending: jax.Array | None = None
        if self._several:
            self._sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))  # a flag per device
            self._any = jax.jit(jnp.any, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __call__(self, done: int, requested: str) -> bool:
        if not self._several:
            return bool(requested)
        if done != self._step:  # the first call of a step votes; later ones keep its decision
            previous, self._pending = self._pending, self._vote(bool(requested))
            self._step, self._decision = done, previous is not None and bool(previous)
        return self._decision

    def _vote(self, flag: bool) -> jax.Array:
        devices = self._sharding.addressable_devices
        flags = [jax.device_put(np.array([flag]), d) for d in devices]
        count = self._sharding.mesh.size
        return self._any(jax.make_array_from_single_device_arrays((count,), self._sharding, flags))


def _client():
    """JAX's coordination-service client, None on one process. JAX keeps it in a private
    module; jax.experimental.multihost_utils offers only device collectives."""
    try:  # private: guarded against a jax that moves it
        from jax._src.distributed import global_state
    except ImportError:
        if jax.distributed.is_initialized():
            raise UserError(
                f"jax {jax.__version__} has no jax._src.distributed.global_state, which several "
                "processes coordinate through; install the jax version pyproject.toml pins"
            ) from None
        return None
    return global_state.client


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress: process 0 (or the
    only one; asked before `initialize`, it touches no device)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def _ints(count: str, index: str) -> tuple[int, int]:
    try:
        n, i = int(count), int(index)
    except ValueError:
        raise UserError(
            f"LMJAX_NUM_PROCESSES={count!r}, LMJAX_PROCESS_ID={index!r} must be whole numbers"
        ) from None
    if not (n >= 1 and 0 <= i < n):
        raise UserError(f"LMJAX_PROCESS_ID={i} must be in 0..LMJAX_NUM_PROCESSES-1 (LMJAX_NUM_PROCESSES={n})")
    return n, i


def _tpu_workers() -> int:
    """Workers in this Cloud TPU slice, read as JAX's own cluster detection reads them (1 off
    a TPU VM). Private JAX modules: if they move, a TPU pod needs the explicit variables."""
    try:  # importing jax (above) noted whether this is a Cloud TPU VM
        from jax._src import cloud_tpu_init
        from jax._src.clusters import cloud_tpu_cluster as tpu

        if not cloud_tpu_init.running_in_cloud_tpu_vm:
            return 1
        for env in (tpu.GkeTpuCluster, tpu.GceTpuCluster):
            if env.is_env_present():
                return env.get_process_count()
    except Exception:  # noqa: BLE001 - no TPU metadata: not a pod
        return 1
    return 1
