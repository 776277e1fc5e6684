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

import jax
from measure import record_header

from lmjax import config, loop, plot, sharding

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
        print(f"lmjax: error: {e}", file=sys.stderr)
        return 2
    ablations = leave_one_out(*experiments) if args.ablate else {}

    def trained(exp: config.Experiment) -> dict:
        workdir = Path(args.workdir) / exp.name
        start = time.time()
        loop.run(exp, workdir)
        return _run_summary(exp, workdir, time.time() - start)

    runs = [trained(exp) for exp in experiments]
    record = _compare(runs)
    if ablations:
        record["ablations"] = [_ablation(option, trained(exp), runs[0]) for option, exp in ablations.items()]
    name = f"recipe-{args.pair or 'custom'}-{_device_tag()}{'-' + args.tag if args.tag else ''}"
    record = _header(experiments[0], runs) | record
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    _plot([Path(args.workdir) / exp.name for exp in experiments], results / f"{name}.png")
    print(json.dumps(record["comparison"] | {"ablations": record.get("ablations", [])}, indent=2))
    return 0


# The candidate's options, each as the settings it consists of: `--ablate` trains the candidate
# once without each option it has (its settings back at the baseline's), to show what each buys.
OPTIONS = {
    "muon": ("optim.name", "optim.muon_lr", "optim.muon_momentum"),
    "wsd": ("optim.schedule", "optim.decay_fraction", "optim.min_lr_ratio"),
    "mlp": ("model.mlp",),
    "qk_norm": ("model.qk_norm",),
    "zero_init": ("model.zero_init",),
    "logit_softcap": ("model.logit_softcap",),
    "z_loss": ("model.z_loss",),
}


def leave_one_out(baseline: config.Experiment, candidate: config.Experiment) -> dict[str, config.Experiment]:
    """For each option in which the candidate differs from the baseline: the candidate with that
    option's settings set back to the baseline's, named `<candidate>-without_<option>`."""
    before, after = config.flat(baseline), config.flat(candidate)
    out = {}
    for option, keys in OPTIONS.items():
        if all(before[k] == after[k] for k in keys):
            continue
        overrides = [
            f"{k}={json.dumps(before[k]) if not isinstance(before[k], str) else before[k]}" for k in keys
        ]
        exp = config.apply_overrides(candidate, [*overrides, f"name={candidate.name}-without_{option}"])
        config.validate(exp)
        out[option] = exp
    return out


def _ablation(option: str, run: dict, baseline: dict) -> dict:
    target = baseline["final_eval_loss"]
    needed = tokens_to_reach(run["eval_curve"], target)
    baseline_needed = tokens_to_reach(baseline["eval_curve"], target)
    return {
        "without": option,
        "experiment": run["experiment"],
        "final_eval_loss": run["final_eval_loss"],
        "final_eval_bpb": run["final_eval_bpb"],
        "tokens_to_reach_target": needed,
        "tokens_saved": None if needed is None else 1 - needed / baseline_needed,
        "eval_curve": run["eval_curve"],
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", choices=sorted(PAIRS))
    parser.add_argument("--baseline", help="an experiment name or .py path (instead of --pair)")
    parser.add_argument("--candidate", help="an experiment name or .py path (instead of --pair)")
    parser.add_argument("--set", action="append", default=[], help="an override for both runs")
    parser.add_argument("--workdir", default="runs/recipe", help="each run trains in WORKDIR/<name>")
    parser.add_argument("--tag", default="", help="suffix of the result's file name")
    parser.add_argument("--ablate", action="store_true", help="also train the candidate without each option")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON and PNG go")
    args = parser.parse_args(argv)
    if not args.pair and not (args.baseline and args.candidate):
        parser.error("give --pair, or --baseline and --candidate")
    return args


# What a pair must share for "tokens to reach the same held-out loss" to mean anything: the
# tokens seen, the held-out measurement (and the tokenizer it counts tokens with), the model's size.
SHARED = (
    *("train.steps", "train.batch_size", "train.eval_every", "train.eval_batches"),
    *("model.seq_len", "model.d_model", "model.n_layers", "model.n_heads", "model.vocab_size"),
)


def _require_comparable(a: config.Experiment, b: config.Experiment) -> None:
    left, right = config.flat(a), config.flat(b)
    for key in [*SHARED, *(k for k in left if k.startswith("data."))]:
        if left[key] != right[key]:
            raise config.UserError(f"{key} differs ({left[key]} vs {right[key]}); the pair must share it")
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
    resolved = config.from_dict(runs[0]["config"])
    header = record_header("recipe", exp, sharding.make_mesh(resolved), ("jax", "jaxlib", "flax", "optax"))
    header.pop("config")  # each run's config is in its own entry
    header["experiment"] = [r["experiment"] for r in runs]
    header["host_cpus"] = os.cpu_count()
    return header


def _device_tag() -> str:
    return f"{jax.default_backend()}{jax.device_count()}"


def _plot(workdirs: list[Path], out: Path) -> None:
    plot.plot_runs(workdirs, x="tokens", out=out)


if __name__ == "__main__":
    sys.exit(main())
