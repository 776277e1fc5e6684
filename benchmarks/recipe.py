"""What a training recipe buys per token: train a baseline and a candidate experiment of the same
model size, data and token budget, and compare their held-out curves.

    python benchmarks/recipe.py --pair cpu          # recipe_gpt2_cpu vs recipe_improved_cpu
    python benchmarks/recipe.py --pair gpu          # recipe_gpt2_gpu vs recipe_improved_gpu
    python benchmarks/recipe.py --baseline A --candidate B [--set key=value ...] [--tag T]

Each run trains in `--workdir/<experiment>` (default: runs/recipe/), so an interrupted
benchmark resumes where it stopped and a finished run is not trained again. Both experiments
must score the whole validation split (`train.eval_batches=0`) at the same steps.

Reported, in `benchmarks/results/recipe-<pair>-<platform><devices>[-tag].json` and a PNG of
both curves (`lmjax.plot`): each run's held-out loss and bits per byte at equal tokens (the
end), its curve, tokens/s and wall time; and the tokens each run needs to reach the baseline's
final held-out loss (the first crossing on its curve, linearly interpolated between
evaluations), and the share of tokens the candidate saves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from lmjax import config

RESULTS = Path(__file__).parent / "results"
PAIRS = {
    "cpu": ("recipe_gpt2_cpu", "recipe_improved_cpu"),
    "gpu": ("recipe_gpt2_gpu", "recipe_improved_gpu"),
}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    baseline, candidate = PAIRS[args.pair] if args.pair else (args.baseline, args.candidate)
    try:
        experiments = [
            config.apply_overrides(config.load_experiment(n), args.set) for n in (baseline, candidate)
        ]
        for exp in experiments:
            config.validate(exp)
        _require_comparable(*experiments)
    except config.UserError as e:
        print(f"recipe: error: {e}", file=sys.stderr)
        return 2

    from lmjax import train

    runs = []
    for exp in experiments:
        workdir = Path(args.workdir) / exp.name
        start = time.time()
        train.run(exp, workdir)
        runs.append(_run_summary(exp, workdir, time.time() - start))
    record = _compare(runs)
    name = f"recipe-{args.pair or 'custom'}-{_device_tag()}{'-' + args.tag if args.tag else ''}"
    record = _header(experiments[0], runs) | record
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot([Path(args.workdir) / exp.name for exp in experiments], results / f"{name}.png")
    print(json.dumps(record["comparison"], indent=2))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS))
    parser.add_argument("--baseline", help="an experiment name or .py path (instead of --pair)")
    parser.add_argument("--candidate", help="an experiment name or .py path (instead of --pair)")
    parser.add_argument("--set", action="append", default=[], help="an override for both runs")
    parser.add_argument("--workdir", default="runs/recipe", help="each run trains in WORKDIR/<name>")
    parser.add_argument("--tag", default="", help="suffix of the result's file name")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    if not args.pair and not (args.baseline and args.candidate):
        parser.error("give --pair, or --baseline and --candidate")
    return args


def _require_comparable(a: config.Experiment, b: config.Experiment) -> None:
    """Same tokens seen and the same held-out measurement, or the comparison means nothing."""
    for key in ("train.steps", "train.batch_size", "model.seq_len", "train.eval_every", "train.eval_batches"):
        left, right = config.flat(a)[key], config.flat(b)[key]
        if left != right:
            raise config.UserError(f"{key} differs ({left} vs {right}); the pair must share it")
    if a.train.eval_batches != 0:
        raise config.UserError("set train.eval_batches=0 so both runs score the whole validation split")


def _run_summary(exp: config.Experiment, workdir: Path, wall_s: float) -> dict:
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = exp.train.batch_size * exp.model.seq_len
    curve = [
        [r["step"], r["step"] * tokens_per_step, r["eval_loss"], r["eval_bpb"]]
        for r in lines
        if "eval_loss" in r
    ]
    rates = [r["tokens_per_s"] for r in lines if "tokens_per_s" in r]
    return {
        "experiment": exp.name,
        "config": json.loads((workdir / "config.json").read_text()),
        "tokens": exp.train.steps * tokens_per_step,
        "final_eval_loss": curve[-1][2],
        "final_eval_bpb": curve[-1][3],
        "final_train_loss": [r["loss"] for r in lines if "loss" in r][-1],
        "tokens_per_s": statistics.median(rates) if rates else None,
        "wall_s": round(wall_s, 1),  # this invocation's: less than the run's when it resumed
        "eval_curve": curve,
    }


def tokens_to_reach(curve: list[list[float]], target: float) -> float | None:
    """Tokens at which a held-out curve ([step, tokens, loss, bpb] rows) first falls to `target`,
    linearly interpolated between evaluations; None if it never does."""
    previous = None
    for _, tokens, loss, _ in curve:
        if loss <= target:
            if previous is None:
                return tokens
            t0, l0 = previous
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


def _compare(runs: list[dict]) -> dict:
    baseline, candidate = runs
    target = baseline["final_eval_loss"]
    needed = [tokens_to_reach(r["eval_curve"], target) for r in runs]
    saved = None if needed[1] is None else 1 - needed[1] / needed[0]
    return {
        "comparison": {
            "baseline": baseline["experiment"],
            "candidate": candidate["experiment"],
            "tokens_each": baseline["tokens"],
            "eval_bpb_at_equal_tokens": [baseline["final_eval_bpb"], candidate["final_eval_bpb"]],
            "eval_loss_at_equal_tokens": [baseline["final_eval_loss"], candidate["final_eval_loss"]],
            "target_eval_loss": target,
            "tokens_to_reach_target": needed,
            "candidate_tokens_saved": saved,
        },
        "runs": runs,
    }


def _header(exp: config.Experiment, runs: list[dict]) -> dict:
    from measure import record_header

    from lmjax import sharding

    resolved = config.from_dict(runs[0]["config"])
    header = record_header("recipe", exp, sharding.make_mesh(resolved), ("jax", "jaxlib", "flax", "optax"))
    header.pop("config")  # each run's config is in its own entry
    header["experiment"] = [r["experiment"] for r in runs]
    header["host_cpus"] = os.cpu_count()
    return header


def _device_tag() -> str:
    import jax

    return f"{jax.default_backend()}{jax.device_count()}"


def _plot(workdirs: list[Path], out: Path) -> None:
    try:
        from lmjax import plot
    except ImportError:  # lmjax.plot needs matplotlib
        print("recipe: matplotlib missing, no PNG", file=sys.stderr)
        return
    plot.main([*map(str, workdirs), "--x", "tokens", "-o", str(out)])


if __name__ == "__main__":
    sys.exit(main())
