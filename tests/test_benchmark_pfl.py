"""The benchmark on personalized-FL bases, end to end on the embedded model and data (shrunk): a FedAvg and a DEPT
base in one run; the pFL base reuses FedAvg's learning-rate choice, trains the PS generator and personalizes every
seen client on that client's own personal base; the report compares FedP²EFT per base. FedDPA-T and FedSA-LoRA
take the same runner path (a personal base is an overlay, ``core/pfl.py``); their own overlays are tested in
test_core_pfl.py, and each further base here would add a quarter of the suite's longest fixture."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedp2eft.benchmark.config import resolve
from fedp2eft.cli import main
from fedp2eft.errors import FedP2EFTError

BASES = ["fedavg", "dept"]
SHRINK = ["methods=[lora,fedp2eft]", "psg.lr_scale=lora", "seeds=[0]", "budgets=[2]", "psg.rounds=1", "base.rounds=1"]


@pytest.fixture(scope="module")
def bases_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    overrides = [f"base.algorithm=[{','.join(BASES)}]", "name=bases", *SHRINK]
    assert main(["benchmark", "--config", "quick", "--results", str(results), *overrides]) == 0
    return results / "bases"


def test_each_base_is_reported_and_compared(bases_run):
    report = (bases_run / "report.md").read_text()
    assert "## FedP²EFT minus the best baseline" in report
    results = json.loads((bases_run / "results.json").read_text())["bases"]
    assert list(results) == BASES
    for base in BASES:
        assert f"## Base: {base}" in report and (bases_run / base / "report.md").is_file()
        assert {row["pool"] for row in results[base]["summary"]} == {"seen"}
        assert {(c["method"], c["budget"]) for c in results[base]["comparisons"]} == {("base", 2), ("lora", 2)}


def test_personalized_bases_keep_client_state_and_reuse_fedavgs_learning_rates(bases_run):
    chosen = json.loads((bases_run / "fedavg" / "selection.json").read_text())
    assert chosen["pool"] == "unseen"  # FedAvg chose on clients no base has seen
    for base in BASES[1:]:
        selection = json.loads((bases_run / base / "selection.json").read_text())
        assert selection["reused_from"] == str(bases_run / "fedavg" / "selection.json")
        assert selection["chosen"] == chosen["chosen"]
        metadata = json.loads((bases_run / base / "base" / "model" / "pfl.json").read_text())
        assert metadata["algorithm"] == base and set(metadata["client_rounds"].values()) == {1}
        states = sorted(p.name for p in (bases_run / base / "base" / "clients").iterdir())
        assert states == [f"client-{i:05d}" for i in range(len(metadata["client_rounds"]))]
        records = [json.loads(line) for line in (bases_run / base / "personalize.jsonl").read_text().splitlines()]
        assert {r["pool"] for r in records} == {"seen"}
    # the same seen clients start from different bases (FedAvg's shared model, their own personal bases): LoRA on
    # top of them trains to different losses (a one-round base may still predict one class everywhere)
    losses = {base: [row["train_loss_last_epoch"] for line in (bases_run / base / "personalize.jsonl").read_text()
                     .splitlines() for row in json.loads(line)["rows"] if row["method"] == "lora"] for base in BASES}
    assert len({tuple(v) for v in losses.values()}) == len(BASES)


def test_publishing_a_multi_base_run_keeps_every_link_working(bases_run, tmp_path):
    """benchmarks/publish_results.py on a run with one sub-run per base: the page and every base's copied report
    link only to files that were copied."""
    script = Path(__file__).parents[1] / "benchmarks" / "publish_results.py"
    subprocess.run([sys.executable, str(script), str(bases_run), str(tmp_path), "--page", "results-bases.md"],
                   check=True, capture_output=True)
    pages = [tmp_path / "results-bases.md"] + [tmp_path / "results" / "bases" / base / "report.md" for base in BASES]
    checked = 0
    for page in pages:
        for link in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not link.startswith("http"):
                assert (page.parent / link).is_file(), f"{page.name} links to missing {link}"
                checked += 1
    assert checked > len(BASES)  # the base reports and their figures, not only the top page's links


@pytest.mark.parametrize("overrides, message", [
    (["base.algorithm=fedsgd"], "base.algorithm 'fedsgd'"),
    (["base.algorithm=dept", "pools=[unseen]"], "seen clients only"),
    (["base.algorithm=[dept,fedavg]"], "starts with fedavg"),
    (["base.algorithm=dept", "base.checkpoint=/tmp"], "leave base.checkpoint empty"),
])
def test_bad_base_settings_are_named_before_any_work(overrides, message):
    with pytest.raises(FedP2EFTError, match=message):
        resolve("quick", overrides)
