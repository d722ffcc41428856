"""The example task configs (examples/task-*.yaml) are what their train-* commands accept, and bad ones are
named before any model is loaded."""

from pathlib import Path

import pytest

from fedp2eft.commands.federated import check_task_config, commands, read_task_config
from fedp2eft.errors import FedP2EFTError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("command", sorted(commands()))
def test_every_train_command_has_an_example_it_accepts(command):
    task = commands()[command][0]
    path = EXAMPLES / f"task-{task}.yaml"
    config = read_task_config(path)
    check_task_config(task, config, str(path))
    assert f"fedp2eft {command} --config examples/task-{task}.yaml" in path.read_text()


def test_one_file_does_not_pass_for_another_command():
    config = read_task_config(EXAMPLES / "task-base.yaml")
    with pytest.raises(FedP2EFTError, match="unknown key"):
        check_task_config("psg", config, "task-base.yaml")  # base training settings are not a generator's
    with pytest.raises(FedP2EFTError, match="budgets must list"):
        check_task_config("psg", {**read_task_config(EXAMPLES / "task-psg.yaml"), "budgets": [64]}, "x.yaml")
    with pytest.raises(FedP2EFTError, match=r"missing \['dataset'\]"):
        check_task_config("base", {"model": "m"}, "x.yaml")
