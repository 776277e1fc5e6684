"""The device mesh and the logical-axis rules: where every array lives is decided here.

Parameters carry logical axis names (`nnx.Param(..., out_sharding=("embed", "mlp"))`) and
activations call `constrain(x, names)`; the experiment's `mesh.rules` map those names to the
mesh axes data / fsdp / tensor. Run model code inside `use(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lmjax import config

AXES = ("data", "fsdp", "tensor")
_RULES: contextvars.ContextVar[config.Rules] = contextvars.ContextVar("lmjax_rules", default=())


def make_mesh(exp: config.Experiment, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), Auto axis types.

    Over several processes the inner axes stay inside a process as far as its devices go
    (tensor first, then fsdp, then data) and the outer ones span processes, so the
    bandwidth-hungry tensor collectives use the fast links within a host."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(exp, len(devices))
    processes = len({d.process_index for d in devices})
    if processes == 1:
        grid = np.asarray(devices).reshape(shape)
    else:
        grid = _across_processes(devices, shape, processes)
    return jax.sharding.Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def mesh_shape(exp: config.Experiment, n_devices: int) -> tuple[int, int, int]:
    """Resolve -1 and check the mesh and the batch against the device count."""
    mc, m, t = exp.mesh, exp.model, exp.train
    sizes = [mc.data, mc.fsdp, mc.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        config.require(
            n_devices % fixed == 0,
            f"mesh (data, fsdp, tensor)={tuple(sizes)}: the fixed axes multiply to {fixed}, which "
            f"does not divide the {n_devices} devices; pick sizes whose product divides it",
        )
        sizes[sizes.index(-1)] = n_devices // fixed
    data, fsdp, tensor = sizes
    config.require(
        data * fsdp * tensor == n_devices,
        f"mesh data*fsdp*tensor={data}x{fsdp}x{tensor}={data * fsdp * tensor} does not match "
        f"the {n_devices} devices; make the product {n_devices} or set one axis to -1",
    )
    micro = t.batch_size // t.microbatches
    config.require(
        micro % (data * fsdp) == 0,
        f"batch per micro-step {micro} (train.batch_size/train.microbatches) is not divisible "
        f"by mesh.data*mesh.fsdp={data * fsdp}; change train.batch_size or the mesh",
    )
    for key, value in [
        ("model.n_heads", m.n_heads),
        ("model.n_kv_heads", m.kv_heads),
        ("model.d_ff", m.ff_dim),
    ]:
        config.require(
            value % tensor == 0,
            f"mesh.tensor={tensor} does not divide {key}={value}; pick a tensor size dividing it",
        )
    config.require(
        m.padded_vocab % tensor == 0,
        f"mesh.tensor={tensor} does not divide the padded vocabulary {m.padded_vocab}; "
        "pick a tensor size dividing 128",
    )
    config.require(
        m.d_model % fsdp == 0,
        f"mesh.fsdp={fsdp} does not divide model.d_model={m.d_model}; pick an fsdp size dividing it",
    )
    return data, fsdp, tensor


def _across_processes(devices: list[jax.Device], shape: tuple[int, ...], processes: int) -> np.ndarray:
    """`devices` laid out in `shape`, each process's devices together in the innermost axes."""
    per_process = len(devices) // processes
    inner, left = [1] * len(shape), per_process
    for axis in reversed(range(len(shape))):  # tensor, fsdp, data: inner axes filled first
        inner[axis] = math.gcd(shape[axis], left)
        left //= inner[axis]
    outer = [size // i for size, i in zip(shape, inner, strict=True)]
    if left == 1 and per_process * processes == len(devices):
        try:  # the within-host order that suits the interconnect (TPU topology)
            return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, process_is_granule=True)
        except (ValueError, AssertionError, NotImplementedError):
            pass
    # An uneven split: each process's devices still lie next to each other.
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.asarray(ordered).reshape(shape)


@contextlib.contextmanager
def use(mesh: jax.sharding.Mesh, rules: config.Rules) -> Iterator[None]:
    """Make `mesh` and `rules` current for tracing model code and placing state."""
    token = _RULES.set(rules)
    try:
        # flax reads its own copy of the rules when it shapes variables under a mesh.
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            yield
    finally:
        _RULES.reset(token)


def spec(logical_names: Sequence[str | None]) -> PartitionSpec:
    """PartitionSpec of logical names under the current rules (None stays unsharded)."""
    rules = dict(_RULES.get())
    return PartitionSpec(*(None if name is None else rules[name] for name in logical_names))


def named(mesh: jax.sharding.Mesh, logical_names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, spec(logical_names))


def constrain(x: jax.Array, logical_names: Sequence[str | None]) -> jax.Array:
    """Pin an activation's layout; a no-op outside a mesh (single-device use, tests)."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical_names))


def state_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """NamedShardings for a split model state, from each Param's logical names."""

    def place(var: nnx.Variable) -> nnx.Variable:
        return var.replace(named(mesh, var.get_metadata()["out_sharding"]))

    return jax.tree.map(place, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Where batches live: rows over the mesh axes the rules give "batch", positions whole."""
    return named(mesh, ("batch", None))


def host_rows(
    batch_sh: jax.sharding.Sharding, batch_size: int, devices: Sequence[jax.Device] | None = None
) -> np.ndarray:
    """Rows of the global batch that `devices` (default: this process's) hold under `batch_sh`.

    Read off the sharding itself, so a batch replicated over tensor axes that span hosts is
    loaded by each of those hosts."""
    devices = batch_sh.addressable_devices if devices is None else devices
    index_map = batch_sh.devices_indices_map((batch_size, 1))
    rows = set()
    for d in devices:
        rows.update(range(*index_map[d][0].indices(batch_size)))
    return np.array(sorted(rows), np.int64)


class BatchPlacement:
    """A global batch of `batch_size` rows on `mesh`: the rows this host builds (`rows`, worked
    out once) and how they become global arrays (`put`). Create it under `use(mesh, rules)`."""

    def __init__(self, mesh: jax.sharding.Mesh, batch_size: int):
        self.sharding = batch_sharding(mesh)
        self.batch_size = batch_size
        self.rows = host_rows(self.sharding, batch_size)

    def put(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows (`rows`, in that order) -> global arrays of `batch_size` rows."""
        out = {}
        for name, x_B in host_batch.items():
            if len(x_B) != len(self.rows):
                raise ValueError(f"{name} has {len(x_B)} rows; this host holds {len(self.rows)}")
            shape = (self.batch_size, *x_B.shape[1:])
            out[name] = jax.make_array_from_process_local_data(self.sharding, x_B, shape)
        return out

    def put_global(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A whole global batch, which every host holds -> global arrays (each host gives its rows)."""
        if len(self.rows) == self.batch_size:  # one host, or every row on every host
            return self.put(batch)
        return self.put({name: x_B[self.rows] for name, x_B in batch.items()})


def per_shard(
    fn: Callable, in_names: Sequence[Sequence[str | None]], out_names: Sequence[str | None]
) -> Callable:
    """`fn` run on each device's shard (shard_map) under the current mesh and rules. For kernels
    XLA cannot partition (Pallas calls): left to XLA, they would run on gathered arrays."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    in_specs = tuple(spec(names) for names in in_names)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=spec(out_names), check_vma=False)
