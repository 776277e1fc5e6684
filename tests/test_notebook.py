"""notebooks/quickstart.ipynb runs top to bottom on CPU, in a kernel of this venv, against the
installed checkout (no install, no network), with a few steps of a tiny model."""

import glob
import json
import math
import os
import sys
from pathlib import Path

import jax
import nbformat
import pytest
from conftest import TINY_DATA, TINY_TRAIN_SETS
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"

# The session's corpus and a one-layer model (conftest), for seconds rather than minutes.
TINY_SETS = [*TINY_TRAIN_SETS, "optim.warmup_steps=2", "optim.lr=1e-2"]
STEPS = 12


def parameters_for_test(workdir: Path | str, steps: int = STEPS) -> str:
    """A cell after the parameters cell (papermill's way). The kernel is another process: it must
    be this venv's Python and see the caches conftest points at."""
    return "\n".join(
        [
            "import os, sys",
            f"assert sys.prefix == {sys.prefix!r}, sys.prefix",
            *(
                f"assert os.environ.get({name!r}) == {os.environ[name]!r}"
                for name in ("LMJAX_CACHE", "JAX_COMPILATION_CACHE_DIR")
            ),
            f"STEPS = {steps}",
            "INSTALL = False",
            f"WORKDIR = {str(workdir)!r}",
            f"EXTRA_SETS = {TINY_SETS!r}",
            "SAMPLE_TOKENS = 8",
        ]
    )


def run_notebook(folder: Path, workdir: Path | str, steps: int = STEPS) -> tuple[dict, dict[str, str]]:
    """Execute the notebook in a new kernel in `folder`; (its cells by tag, their text output)."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "commit it with outputs cleared"
    )
    tags = [c.metadata.get("tags", []) for c in nb.cells]
    at = next(i for i, t in enumerate(tags) if "parameters" in t)
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell(parameters_for_test(workdir, steps)))

    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
    ).execute()

    tagged = {c.metadata["tags"][0]: c for c in nb.cells if c.metadata.get("tags")}
    return tagged, {tag: _text(cell) for tag, cell in tagged.items()}


@pytest.mark.slow  # a kernel, a training run and a sampler: ~15-30 s on 2 cores
def test_quickstart_runs_top_to_bottom(tmp_path):
    tagged, out = run_notebook(tmp_path, tmp_path / "run")
    assert "jax " in out["install"] and "cpu" in out["install"] and "pip install" not in out["install"]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert [r["step"] for r in records if "loss" in r][-1] == STEPS
    assert losses[-1] < losses[0] - 0.3 and losses[0] < math.log(TINY_DATA.vocab_size) + 0.5
    assert (tmp_path / "run" / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert any(o.output_type == "display_data" and "image/png" in o.data for o in tagged["plot"].outputs)
    assert f"held-out at step {STEPS}:" in out["plot"]
    assert out["sample"].startswith("--- 'def '\ndef ") and "\n--- 'import '\nimport " in out["sample"]
    assert "gpt2_124m" in out["plan"]


@pytest.mark.slow
def test_quickstart_on_a_bucket_resumes_where_a_lost_runtime_stopped(tmp_path, bucket):
    """WORKDIR on a bucket (the test's GCS server): a first runtime trains 6 steps and is gone;
    a new one, run with the full STEPS, resumes from the bucket's checkpoint."""
    workdir = f"{bucket}/quickstart"
    run_notebook(tmp_path, workdir, steps=6)
    _, out = run_notebook(tmp_path, workdir)
    assert f"resuming from step 6 of {STEPS}" in out["train"]
    assert f"held-out at step {STEPS}:" in out["plot"]
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")  # shown from a local file
    assert out["sample"].startswith("--- 'def '\ndef ")


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.skipif(
    bool(glob.glob("/dev/accel*") + glob.glob("/dev/vfio/[0-9]*")), reason="a TPU picks [tpu]"
)
@pytest.mark.parametrize(
    "nvidia_smi, extra, driver",
    [
        (None, "", None),
        ("echo 580.65.06", "[cuda]", "580.65.06"),  # CUDA 13 wheels need a driver 580 or newer
        ("echo 550.54.15", "[cuda12]", "550.54.15"),
        ("exit 9", "[cuda12]", "unknown"),  # nvidia-smi failing: CUDA 12, which older drivers run too
    ],
)
def test_install_cell_picks_the_cuda_wheels_the_driver_runs(
    tmp_path, monkeypatch, capsys, nvidia_smi, extra, driver
):
    """The install cell (INSTALL = False) with a stand-in nvidia-smi and jax on the CPU: the extra
    it would install, and a one-line warning that jax found no GPU where nvidia-smi is."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no real nvidia-smi
    if nvidia_smi:
        (tmp_path / "nvidia-smi").write_text(f"#!/bin/sh\n{nvidia_smi}\n")
        (tmp_path / "nvidia-smi").chmod(0o755)
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.delenv("COLAB_TPU_ADDR", raising=False)
    cell = next(
        c for c in nbformat.read(NOTEBOOK, as_version=4).cells if "install" in c.metadata.get("tags", [])
    )
    namespace = {"INSTALL": False, "REPO": "unused", "WORKDIR": "runs/quickstart"}
    exec(cell.source, namespace)
    assert namespace["accelerator_extra"]() == extra
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]
    if driver:
        assert len(warnings) == 1 and f"(driver {driver}) but jax runs on the CPU" in warnings[0]
    else:
        assert warnings == []
