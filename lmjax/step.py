"""Train state created in its sharded layout, and the jitted train and eval steps.

The state is a plain dict `{"params", "opt_state", "step", "rng"}` of arrays; the model's structure
lives in its `graphdef` (`nnx.split`), and the steps are pure functions over the state, jitted
once with explicit in/out shardings and donation. The state's layout is decided in
`state_shardings`; batches are laid out by `sharding.batch_sharding` (`sharding.BatchPlacement`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmjax import config, loss, model, optim, sharding

State = dict[str, Any]  # params: nnx.State, opt_state: optax.OptState, step and rng: jax.Array
Batch = dict[str, jax.Array]


def abstract_model(cfg: config.Model) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graphdef and parameter shapes, without allocating anything."""
    abstract = nnx.eval_shape(lambda: model.Transformer(cfg, rngs=nnx.Rngs(0)))
    return nnx.split(abstract)


def state_shardings(
    abstract_params: nnx.State, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> State:
    """Parameters by their logical names under the rules; optimizer moments like their params."""
    param_sh = sharding.state_shardings(abstract_params, mesh)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_sh = optim.tree_map_params(
        tx, lambda _, s: s, abstract_opt, param_sh, transform_non_params=lambda _: replicated
    )
    return {"params": param_sh, "opt_state": opt_sh, "step": replicated, "rng": replicated}


def init_state(
    exp: config.Experiment,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    params: nnx.State | None = None,
) -> tuple[nnx.GraphDef, State, State]:
    """(graphdef, state, shardings): parameters and optimizer state are created directly on
    their devices by one jitted initialiser, never whole on one host. `params` (a warm start)
    replaces the random initial parameters; the optimizer still starts fresh at step 0."""
    graphdef, abstract_params = abstract_model(exp.model)
    shardings = state_shardings(abstract_params, tx, mesh)
    key = jax.random.key(exp.train.seed)
    if params is None:
        state = jax.jit(_initial_state(exp, tx), out_shardings=shardings)(key)
    else:
        state = jax.jit(_initial_state(exp, tx), out_shardings=shardings, donate_argnums=1)(key, params)
    return graphdef, state, shardings


def abstract_state(
    exp: config.Experiment, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[nnx.GraphDef, State, State]:
    """(graphdef, shapes and shardings of the state, shardings): a restore target on `mesh`."""
    graphdef, abstract_params = abstract_model(exp.model)
    shardings = state_shardings(abstract_params, tx, mesh)
    shapes = jax.eval_shape(_initial_state(exp, tx), jax.random.key(0))
    return graphdef, with_shardings(shapes, shardings), shardings


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """A tree of ShapeDtypeStructs placed by `shardings` (what Orbax restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings)


def _initial_state(exp: config.Experiment, tx: optax.GradientTransformation) -> Callable[..., State]:
    def init(key: jax.Array, params: nnx.State | None = None) -> State:
        if params is None:
            params = nnx.state(model.Transformer(exp.model, rngs=nnx.Rngs(params=key)))
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            # Saved and restored with the state; stochastic layers would fold in the step.
            "rng": jax.random.key_data(jax.random.fold_in(key, 1)),
        }

    return init


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    exp: config.Experiment,
    shardings: State,
    mesh: jax.sharding.Mesh,
) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """One optimizer step on a global batch, accumulated over `train.microbatches`."""
    microbatches = exp.train.microbatches
    lr_schedule = optim.schedule(exp.optim, exp.train.steps)
    z_loss = exp.model.z_loss

    def grads_of(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array, nnx.State]:
        """(summed cross-entropy, summed logsumexp^2, count, gradients of the summed objective)."""

        def objective(p: nnx.State) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            ce_sum, z_sum, count = loss.loss_terms(nnx.merge(graphdef, p), batch)
            # z-loss (PaLM) pulls logsumexp towards 0; off, the objective is the cross-entropy alone.
            return (ce_sum + z_loss * z_sum if z_loss else ce_sum), (ce_sum, z_sum, count)

        (_, (ce_sum, z_sum, count)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return ce_sum, z_sum, count, grads

    def train_step(state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
        params = state["params"]
        if microbatches == 1:
            loss_sum, z_sum, count, grads = grads_of(params, batch)
        else:

            def accumulate(total, micro):
                return jax.tree.map(jnp.add, total, grads_of(params, micro)), None

            zero = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            micro = jax.tree.map(lambda x: _split_microbatches(x, microbatches), batch)
            (loss_sum, z_sum, count, grads), _ = jax.lax.scan(accumulate, zero, micro)
        # Sums over all tokens, divided once: accumulation equals the whole-batch step.
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss_sum / count,  # cross-entropy only, comparable with and without z-loss
            "grad_norm": optax.tree.norm(grads),
            "lr": lr_schedule(state["step"]),
        }
        if z_loss:  # what z-loss adds to the objective: loss + z_loss is what the step minimises
            metrics["z_loss"] = z_loss * z_sum / count
        return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def make_eval_step(
    graphdef: nnx.GraphDef, param_shardings: nnx.State, mesh: jax.sharding.Mesh, token_bytes_V: np.ndarray
) -> Callable[[nnx.State, Batch], tuple[jax.Array, jax.Array, jax.Array]]:
    """(summed loss, target count, UTF-8 bytes of the targets) of one batch; `token_bytes_V`:
    the bytes each token id stands for (`Tokenizer.token_bytes`)."""
    token_bytes_V = np.asarray(token_bytes_V, np.int32)

    def eval_step(params: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array, jax.Array]:
        loss_sum, count = loss.loss_sums(nnx.merge(graphdef, params), batch)
        target_bytes = jnp.where(batch["loss_mask"] > 0, jnp.asarray(token_bytes_V)[batch["targets"]], 0)
        return loss_sum, count, target_bytes.sum()

    return jax.jit(
        eval_step,
        in_shardings=(param_shardings, sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def _split_microbatches(x_B: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B/n, ...], micro-batch m taking rows m, m+n, ...: every device keeps
    contributing its own rows to every micro-batch, so the split moves no data."""
    x = x_B.reshape(x_B.shape[0] // n, n, *x_B.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, (None, "batch") + (None,) * (x_B.ndim - 1))
