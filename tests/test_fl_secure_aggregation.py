"""Secure aggregation (SecAgg+) in Flower: with it on, the server's aggregate is FedAvg's within the quantization
error, and no reply the server receives holds a client's update, only masked vectors (docs/federation.md, "Secure
aggregation")."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.common import bytes_to_ndarray, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid, ServerApp
from flwr.compat.common import recorddict_compat as compat
from flwr.simulation import run_simulation
from safetensors.torch import load_file

from conftest import TOY_CONFIG
from fedp2eft.benchmark.config import resolve
from fedp2eft.errors import FedP2EFTError
from fedp2eft.fl import protocol as P
from fedp2eft.fl.client_app import app as client_app
from fedp2eft.fl.job import Job
from fedp2eft.fl.secure_aggregation import encode_update
from fedp2eft.fl.server_app import sample_clients, serve
from fedp2eft.fl.simulation import backend_settings
from fedp2eft.fl.toy_task import make_task

ROUNDS, PER_ROUND, SEED = 2, 3, 4


class SpyGrid:
    """The real grid, with every reply the server code receives kept for inspection."""

    def __init__(self, grid: Grid, replies: list[Message]) -> None:
        self.grid, self.replies = grid, replies

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Message]]:
    out = tmp_path_factory.mktemp("secagg")
    job = Job(task="toy", task_config=TOY_CONFIG, rounds=ROUNDS, clients_per_round=PER_ROUND, min_clients=2,
              seed=SEED, output_dir=str(out), secagg={})
    replies: list[Message] = []
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(SpyGrid(grid, replies), job)

    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=TOY_CONFIG["num_clients"],
                   backend_name="ray", backend_config=backend_settings(1.0, None, None, PER_ROUND))
    return out, replies


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_secure_aggregate_is_fedavgs_within_the_quantization_error(secure_run) -> None:
    out, _ = secure_run
    task = make_task(TOY_CONFIG)
    weights = task.initial_weights()
    for server_round in range(1, ROUNDS + 1):
        clients = sample_clients(list(range(task.num_clients())), PER_ROUND, SEED, server_round)
        updates = [task.client_update(weights, c, server_round) for c in clients]
        total = sum(u.num_examples for u in updates)
        weights = {k: (sum(u.weights[k].double() * u.num_examples for u in updates) / total).float() for k in weights}
    history = rows(out)
    assert [row["successes"] for row in history] == [PER_ROUND] * ROUNDS
    assert all(row["secagg/shares"] == PER_ROUND and row["secagg/threshold"] == 2 for row in history)
    bound = sum(row["secagg/error_bound"] for row in history)
    assert 0 < bound < 1e-4
    got = load_file(str(out / json.loads((out / "state.json").read_text())["checkpoint"]))
    errors = [float((got[k] - weights[k]).abs().max()) for k in weights]
    # round 2's clients start from round 1's slightly perturbed average, so its error carries over (about once)
    assert max(errors) <= 3 * bound + 1e-6
    assert max(errors) > 0  # quantized: not bit-identical to FedAvg, so the secure path really ran


def test_the_server_never_receives_an_update_only_masked_vectors(secure_run) -> None:
    out, replies = secure_run
    assert all(len(record) == 0 for reply in replies if reply.has_content()
               for record in reply.content.array_records.values())  # the mod emptied the update before replying
    masked = [reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS] for reply in replies
              if reply.has_content() and RECORD_KEY_CONFIGS in reply.content.config_records
              and Key.MASKED_PARAMETERS in reply.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == ROUNDS * PER_ROUND
    for vectors in masked:
        values = np.concatenate([bytes_to_ndarray(blob).ravel() for blob in vectors]).astype(np.float64)
        # quantized updates lie below 2**24; masked ones spread uniformly over [0, 2**32)
        assert 0.35 < values.mean() / 2**32 < 0.65 and values.max() > 2**31
    history = rows(out)
    assert all(row["bytes_received"] > row["bytes_sent"] / 2 for row in history)  # keys, shares and vectors counted


def test_a_client_checks_its_update_before_masking_it() -> None:
    """After masking nobody can vet an update, so the client refuses to send one that would be clipped silently,
    one with NaN, or a weight the masked sum cannot hold; a good one goes out as its difference to the global
    weights."""
    reference = {"w": torch.zeros(3), "steps": torch.tensor([4])}
    config = ConfigRecord({P.SECAGG_CLIPPING: 0.5, P.SECAGG_MAX_WEIGHT: 100.0})
    with pytest.raises(FedP2EFTError, match=r"moved by 0.75, beyond privacy.secagg.clipping_range=0.5"):
        encode_update(reference, {"w": torch.tensor([0.1, -0.75, 0.0]), "steps": torch.tensor([5])}, 10, {}, config)
    with pytest.raises(FedP2EFTError, match="NaN or Inf"):
        encode_update(reference, {"w": torch.tensor([0.1, float("nan"), 0.0]), "steps": torch.tensor([5])}, 10, {},
                      config)
    with pytest.raises(FedP2EFTError, match="more than privacy.secagg.max_weight=100"):
        encode_update(reference, {"w": torch.zeros(3), "steps": torch.tensor([5])}, 101, {}, config)
    fitres = compat.recorddict_to_fitres(encode_update(
        reference, {"w": torch.tensor([0.1, -0.25, 0.0]), "steps": torch.tensor([5])}, 10, {"loss": 0.5}, config), True)
    delta, steps = parameters_to_ndarrays(fitres.parameters)
    assert np.allclose(delta, [0.1, -0.25, 0.0]) and not steps.any()  # counters are not averaged
    assert (fitres.num_examples, fitres.metrics) == (10, {"loss": 0.5})


@pytest.mark.parametrize("settings, per_round, min_clients, message", [
    ({}, 2, 1, "at least 3 clients per round"),
    ({"num_shares": 5}, 4, 2, "num_shares (5) exceeds clients_per_round (4)"),
    ({"num_shares": 3, "reconstruction_threshold": 3}, 4, 2, "below num_shares"),
    ({}, 4, 1, "min_clients (1) is below the SecAgg+ threshold (2)"),
    ({"clipping_range": -1.0}, 4, 2, "clipping_range must be a positive number"),
    ({"quantization_range": 2**30}, 8, 4, "reaches 2**32"),
    ({"shares": 3}, 4, 2, "unknown key(s) ['shares']"),
])
def test_settings_the_protocol_cannot_run_with_are_refused_before_any_round(settings, per_round, min_clients,
                                                                            message, tmp_path) -> None:
    with pytest.raises(FedP2EFTError, match=re.escape(message)):
        Job(task="toy", output_dir=str(tmp_path), rounds=1, clients_per_round=per_round, min_clients=min_clients,
            secagg=settings)


def test_dp_and_secure_aggregation_together_are_refused(tmp_path) -> None:
    with pytest.raises(FedP2EFTError, match="cannot be combined"):
        Job(task="toy", output_dir=str(tmp_path), rounds=1, clients_per_round=4, min_clients=2, secagg={},
            dp={"noise_multiplier": 1.0, "clipping_norm": 0.1})
    with pytest.raises(FedP2EFTError, match="psg: privacy.dp and privacy.secagg cannot be combined"):
        resolve("quick", ["psg.privacy.secagg={}", "psg.privacy.dp={noise_multiplier: 1.0, clipping_norm: 0.1}"])
    with pytest.raises(FedP2EFTError, match=r"base.privacy.secagg needs at least 3 clients per round"):
        resolve("quick", ["base.privacy.secagg={}"])  # the quick profile samples 2 clients per round
    assert resolve("quick", ["psg.clients_per_round=4", "psg.privacy.secagg={clipping_range: 0.5}"])[
        "psg"]["privacy"]["secagg"] == {"clipping_range": 0.5}


def test_the_report_lists_each_securely_aggregated_stage(secure_run, tmp_path: Path) -> None:
    from fedp2eft.benchmark.report.privacy import privacy_markdown, privacy_spent

    out, _ = secure_run
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text())
    (tmp_path / "seed0" / "psg").mkdir(parents=True)
    (tmp_path / "seed0" / "psg" / "metrics.jsonl").write_text('{"round": 1, "train/loss": 0.5}\n')  # in the clear
    entries = privacy_spent(tmp_path)
    bound = max(row["secagg/error_bound"] for row in rows(out))
    assert entries == [{"stage": "base", "rounds": ROUNDS,
                        "secagg": {"shares": PER_ROUND, "threshold": 2, "error_bound": bound}}]
    text = privacy_markdown(entries)
    assert f"| base | {ROUNDS} | {PER_ROUND} | 2 | {bound:.2g} |" in text and "ε" not in text
