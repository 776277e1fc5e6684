"""What checkpoints cost a run: the step's wait for an asynchronous save, the save's time to
land on disk, and restore times, for one experiment's whole train state.

    python benchmarks/checkpoint_io.py [--experiment gpt2_124m] [--set key=value ...]
        [--repeats 3] [--dir DIR] [--out DIR]

The state (parameters, AdamW moments, step, RNG key) is built on the experiment's mesh exactly
as `lmjax.train` builds it (random initial values and one update's moments; no data is read) and saved with
`lmjax.checkpoint.Checkpoints`, as the training loop saves it. Measured, the median of `--repeats`:
- `blocking_s`: how long `save` holds the loop (until the arrays are off the devices);
- `commit_s`: from the start of a save until it is complete on disk;
- `restore_s`: the whole state back onto the same mesh;
- `load_params_s`: the parameters alone onto one device (what evaluation and generation read).
Writes `OUT/checkpoint_io-<experiment>-<platform><devices>.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
from measure import record_header
from throughput import resolve

from lmjax import checkpoint, config, optim, sharding, step

RESULTS = Path(__file__).parent / "results"
IO_PACKAGES = ("orbax-checkpoint", "tensorstore")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="gpt2_124m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default="", help="where the checkpoints go (default: a temporary folder)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="lmjax-ckpt-bench-")).absolute()
    try:
        exp, _ = resolve(args)  # with a vocabulary: no tokenizer here
        record = measure(exp, folder, args.repeats)
    except config.UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    finally:
        if not args.dir:
            shutil.rmtree(folder, ignore_errors=True)
    out = Path(args.out) / f"checkpoint_io-{exp.name}-{record['platform']}{record['devices']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k.endswith(("_s", "_mb_per_s", "_bytes"))}))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def measure(exp: config.Experiment, folder: Path, repeats: int) -> dict:
    mesh = sharding.make_mesh(exp)
    tx = optim.make(exp.optim, exp.train.steps)
    with sharding.use(mesh, exp.mesh.rules):
        _, state, shardings = step.init_state(exp, tx, mesh)
        # One update with the parameters as gradients: moments as incompressible as a trained run's.
        state = jax.jit(
            lambda s: {**s, "opt_state": tx.update(s["params"], s["opt_state"], s["params"])[1]},
            out_shardings=shardings,
            donate_argnums=0,
        )(state)
        jax.block_until_ready(state)
        state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        position = {"loader": {"next_index": 0}, "corpus": "benchmark"}
        blocking, commit, restore, load = [], [], [], []
        for r in range(repeats):
            run = folder / f"run{r}"
            ckpts = checkpoint.Checkpoints(run, exp.checkpoint, log=lambda m: None)
            start = time.perf_counter()
            ckpts.save(state, position, exp)
            blocking.append(time.perf_counter() - start)
            ckpts.wait()
            commit.append(time.perf_counter() - start)
            start = time.perf_counter()
            _, restored = ckpts.restore_newest(lambda saved: step.abstract_state(exp, tx, mesh)[1])
            jax.block_until_ready(restored)
            restore.append(time.perf_counter() - start)
            ckpts.close()
            del restored
            start = time.perf_counter()
            params, _ = checkpoint.load_params(run, log=lambda m: None)
            jax.block_until_ready(params)
            load.append(time.perf_counter() - start)
            del params
            disk_bytes = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
            if r < repeats - 1:
                shutil.rmtree(run)
    return {
        **record_header("checkpoint_io", exp, mesh, ("jax", "jaxlib", "flax", "optax", *IO_PACKAGES)),
        "repeats": repeats,
        "state_bytes": state_bytes,
        "disk_bytes": disk_bytes,
        "blocking_s": statistics.median(blocking),
        "commit_s": statistics.median(commit),
        "restore_s": statistics.median(restore),
        "load_params_s": statistics.median(load),
        "write_mb_per_s": state_bytes / statistics.median(commit) / 1e6,
        "read_mb_per_s": state_bytes / statistics.median(restore) / 1e6,
        "all_s": {"blocking": blocking, "commit": commit, "restore": restore, "load_params": load},
    }


if __name__ == "__main__":
    sys.exit(main())
