"""Generation speed: prefill time and decode tokens/s of `lmjax.generate.Generator` for an
experiment's model, with random initial weights (speed does not depend on them) and random
prompt ids.

    python benchmarks/generate_speed.py [--experiment gpt2_124m] [--batch 1,8] [--prompt-len 128]
        [--new-tokens 64] [--repeats 3] [--set key=value ...] [--out DIR]

Per batch size, the fastest of `--repeats` after a compiling run: `prefill_s` (the prompt
through the model, first token chosen), `decode_tokens_per_s` (batch x new tokens after the
first / their time), `ms_per_step`, and `weights_gb_per_s`: parameter bytes (compute dtype) read
per decode step / step time, the figure a memory-bound decode is judged by.
Writes OUT/generate-<experiment>-<platform><devices>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from measure import record_header
from throughput import resolve

from lmjax import config, optim, sharding, step
from lmjax.generate import Generator

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="gpt2_124m")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--batch", default="1,8", help="batch sizes, comma-separated")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    try:
        exp, _ = resolve(args)  # with a vocabulary: no tokenizer here
        record = measure(exp, [int(b) for b in args.batch.split(",")], args)
    except config.UserError as e:
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) / f"generate-{exp.name}-{record['platform']}{record['devices']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    for r in record["results"]:
        print(json.dumps(r))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def measure(exp: config.Experiment, batches: list[int], args: argparse.Namespace) -> dict:
    mesh = sharding.make_mesh(exp)
    with sharding.use(mesh, exp.mesh.rules):
        _, state, _ = step.init_state(exp, optim.make(exp.optim, 1), mesh)
    generator = Generator(exp, state["params"], None, mesh)  # no tokenizer: never stops early
    del state
    weight_bytes = sum(x.size for x in jax.tree.leaves(generator.params)) * np.dtype(exp.model.dtype).itemsize
    rng = np.random.default_rng(0)
    results = []
    for batch in batches:
        prompts = rng.integers(3, exp.model.vocab_size, (batch, args.prompt_len)).tolist()
        generator.generate_ids(prompts, 1)  # compiles both shapes (the two calls may differ in
        generator.generate_ids(prompts, args.new_tokens)  # cache slots), outside the timing
        prefill, total = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generator.generate_ids(prompts, 1)
            prefill.append(time.perf_counter() - start)
            start = time.perf_counter()
            generator.generate_ids(prompts, args.new_tokens)
            total.append(time.perf_counter() - start)
        # Fastest of the repeats: the same work each time, so slower ones are the host's noise.
        decode_s = min(total) - min(prefill)
        step_s = decode_s / (args.new_tokens - 1)
        result = {
            "batch": batch,
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_s": min(prefill),
        }
        if step_s <= 0:  # timing noise larger than the whole decode: no rate to report
            result["error"] = "decode time lost in timing noise: raise --new-tokens or --repeats"
        else:
            result |= {
                "decode_tokens_per_s": batch / step_s,
                "ms_per_step": step_s * 1e3,
                "weights_gb_per_s": weight_bytes / step_s / 1e9,
            }
        results.append(result)
    return {
        **record_header("generate", exp, mesh, ("jax", "jaxlib", "flax")),
        "weight_bytes": weight_bytes,
        "repeats": args.repeats,
        "results": results,
    }


if __name__ == "__main__":
    sys.exit(main())
