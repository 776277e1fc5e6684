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

import os
from collections.abc import Callable, Mapping

from lmjax.config import UserError

# (lmjax's name, JAX's name) of each explicit setting.
EXPLICIT = (
    ("LMJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    ("LMJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    ("LMJAX_PROCESS_ID", "JAX_PROCESS_ID"),
)
# What `srun` sets in each task: JAX's own SLURM detection needs all of them.
SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")


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
    import jax

    if jax.distributed.is_initialized():  # by the caller (a notebook, another entry point)
        return
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU arrays across processes
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


def is_main() -> bool:
    """Whether this process writes the run's files and prints its progress: process 0 (or the
    only one; asked before `initialize`, it touches no device)."""
    import jax

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
    try:
        import jax  # noqa: F401 - its import notes whether this is a Cloud TPU VM
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
