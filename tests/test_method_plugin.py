"""Adding a method, as docs/architecture.md promises: a folder (tests/plugins/toy_method/) and one entry-point line,
with a learning rate of its own and a federated stage of its own, run through ``fedp2eft benchmark --config quick``
in a fresh process that finds it through the ``fedp2eft.methods`` entry point (nothing in fedp2eft names it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

PLUGINS = Path(__file__).parent / "plugins"


def installed_plugin(site: Path) -> None:
    """What ``pip install`` of a package declaring ``toy = "toy_method:METHOD"`` leaves for entry-point discovery."""
    info = site / "toy_method-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-method\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedp2eft.methods]\ntoy = toy_method:METHOD\n")


def test_a_method_with_its_own_rate_and_stage_runs_through_the_benchmark(quick_run, tmp_path):
    installed_plugin(tmp_path / "site")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(PLUGINS),
                                                         os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", "import sys; from fedp2eft.cli import main; sys.exit(main())", "-q",
               "benchmark", "--config", "quick", "--results", str(tmp_path / "results"), "name=toy",
               "methods=[toy]", "seeds=[0]", "budgets=[2]", f"base.checkpoint={quick_run / 'base' / 'model'}",
               "personalize.toy_lr=5.0e-4", "toy.lr_scale=2.0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "results" / "toy"

    # its stage ran on Flower with its own rate times the stage's scale, and exported its artifact
    rounds = [json.loads(line) for line in (run / "seed0" / "toy" / "metrics.jsonl").read_text().splitlines()]
    assert rounds and all(row["train/toy_lr"] == pytest.approx(5.0e-4 * 2.0, rel=1e-12) for row in rounds)  # a mean
    stage_value = float(load_file(str(run / "seed0" / "toy" / "toy.safetensors"))["mean_examples"])
    assert stage_value > 0

    # selection chose a scale of its own rate on validation rows; every client ran at that rate and used the stage
    chosen = json.loads((run / "selection.json").read_text())["chosen"]["toy"]
    rows = [json.loads(line) for line in (run / "personalize.jsonl").read_text().splitlines()]
    cells = [cell for row in rows for cell in row["rows"] if cell["method"] == "toy"]
    assert len(cells) == 4  # 2 languages x 1 client x 2 pools, one budget
    assert all(cell["lr"] == 5.0e-4 * chosen["2"] and cell["stage_value"] == stage_value for cell in cells)
    assert "toy" in (run / "report.md").read_text()
