"""benchmarks/recipe.py: the tokens-to-target measure, and a tiny pair end to end."""

import json

import pytest
from conftest import TINY_DATA, metrics_of
from test_benchmarks import _benchmark

from lmjax import config

recipe = _benchmark("recipe")

# Both shipped pairs, shrunk to seconds: one layer, 12 steps, evaluated every 4.
TINY_PAIR = [
    f"data.vocab_size={TINY_DATA.vocab_size}",
    f"data.tokenizer_sample_bytes={TINY_DATA.tokenizer_sample_bytes}",
    *("model.d_model=32", "model.n_heads=4", "model.n_layers=1", "model.seq_len=32"),
    *("train.batch_size=8", "train.steps=12", "train.eval_every=4", "train.progress=false"),
    "optim.warmup_steps=2",
]


def test_tokens_to_reach_interpolates_the_first_crossing():
    curve = [[1, 100, 5.0, 0], [2, 200, 4.0, 0], [3, 300, 3.0, 0], [4, 400, 2.5, 0]]
    assert recipe.tokens_to_reach(curve, 3.5) == pytest.approx(250)
    assert recipe.tokens_to_reach(curve, 3.0) == 300
    assert recipe.tokens_to_reach(curve, 6.0) == 100  # already there at the first evaluation
    assert recipe.tokens_to_reach(curve, 2.0) is None  # never
    # A curve that dips, rises and dips again: the first crossing counts.
    assert recipe.tokens_to_reach([[1, 100, 3.0, 0], [2, 200, 4.0, 0], [3, 300, 2.0, 0]], 3.0) == 100


@pytest.mark.parametrize("pair", ["cpu"])
def test_a_pair_end_to_end(tmp_path, stdlib_corpus, pair):
    overrides = [a for s in TINY_PAIR for a in ("--set", s)]
    out, runs = tmp_path / "results", tmp_path / "runs"
    argv = ["--pair", pair, "--workdir", str(runs), "--results", str(out), *overrides]
    assert recipe.main(argv) == 0
    (record_path,) = out.glob(f"recipe-{pair}-*.json")
    record = json.loads(record_path.read_text())
    assert (out / record_path.name.replace(".json", ".png")).read_bytes()[:4] == b"\x89PNG"
    baseline_name, candidate_name = recipe.PAIRS[pair]
    comparison = record["comparison"]
    assert [comparison["baseline"], comparison["candidate"]] == [baseline_name, candidate_name]
    assert comparison["tokens_each"] == 12 * 8 * 32
    for run, name in zip(record["runs"], (baseline_name, candidate_name), strict=True):
        evals = [r for r in metrics_of(runs / name) if "eval_loss" in r]
        assert [[r["step"], r["eval_loss"]] for r in evals] == [[c[0], c[2]] for c in run["eval_curve"]]
        assert [c[0] for c in run["eval_curve"]] == [4, 8, 12]
        assert run["config"]["name"] == name
    baseline_final = record["runs"][0]["final_eval_loss"]
    assert comparison["target_eval_loss"] == baseline_final
    needed = comparison["tokens_to_reach_target"]
    assert needed[0] == recipe.tokens_to_reach(record["runs"][0]["eval_curve"], baseline_final)
    if needed[1] is not None:
        assert comparison["candidate_tokens_saved"] == pytest.approx(1 - needed[1] / needed[0])
    # Running it again trains nothing more and measures the same.
    assert recipe.main(argv) == 0
    assert json.loads(record_path.read_text())["comparison"] == comparison


def test_a_pair_that_sees_different_tokens_is_refused(tmp_path, capsys):
    argv = ["--baseline", "recipe_gpt2_cpu", "--candidate", "stdlib_tiny", "--workdir", str(tmp_path)]
    assert recipe.main(argv) == 2
    assert "train.eval_every differs" in capsys.readouterr().err
    # Tokens to a held-out loss compare only under the same tokenizer.
    other = tmp_path / "other_tokenizer.py"
    other.write_text(
        "import dataclasses\nfrom lmjax.experiments import recipe_improved_cpu as r\n"
        "def config():\n    e = r.config()\n"
        "    return dataclasses.replace(e, data=dataclasses.replace(e.data, vocab_size=4096))\n"
    )
    argv = ["--baseline", "recipe_gpt2_cpu", "--candidate", str(other), "--workdir", str(tmp_path)]
    assert recipe.main(argv) == 2
    assert "data.vocab_size differs (2048 vs 4096)" in capsys.readouterr().err


def test_the_pairs_differ_only_in_the_recipe():
    """Same model size, data, batch, token budget and AdamW settings: only the options differ."""
    options = {k for keys in recipe.OPTIONS.values() for k in keys}
    for baseline, candidate in recipe.PAIRS.values():
        a, b = (config.flat(config.load_experiment(n)) for n in (baseline, candidate))
        differ = {k for k in a if a[k] != b[k]} - {"name"}
        assert differ and differ <= options, differ
        assert a["optim.name"] == "adamw" and a["model.mlp"] == "auto"


def test_leave_one_out_sets_each_option_back_alone():
    baseline, candidate = (config.load_experiment(n) for n in recipe.PAIRS["cpu"])
    ablations = recipe.leave_one_out(baseline, candidate)
    assert set(ablations) == set(recipe.OPTIONS) - {"mlp"}  # every option but ReLU² (left out)
    before, after = config.flat(baseline), config.flat(candidate)
    for option, exp in ablations.items():
        ablated = config.flat(exp)
        assert ablated["name"] == f"recipe_improved_cpu-without_{option}"
        changed = {k for k in after if ablated[k] != after[k]} - {"name"}
        assert changed == {k for k in recipe.OPTIONS[option] if before[k] != after[k]}
        assert all(ablated[k] == before[k] for k in recipe.OPTIONS[option])
