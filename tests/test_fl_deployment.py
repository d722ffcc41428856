"""Real deployment on loopback: one SuperLink, two SuperNodes (partition 0 and 1), ``flwr run``.

Every process is started in its own session and its whole process group is killed at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedp2eft.fl.toy_task import make_task

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOY = {"num_clients": 2, "dim": 5, "hidden": 6, "local_steps": 2, "seed": 5}
ROUNDS = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early with code {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout_s}s")


def stop(process: subprocess.Popen) -> None:
    """Kill the process group the process leads (SuperExec and app children included)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[dict[str, str], int]]:
    """A SuperLink and two SuperNodes; yields the environment for ``flwr`` and the SuperLink port."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    link_port = free_port()
    processes: list[subprocess.Popen] = []

    def spawn(args: list[str], log_name: str) -> subprocess.Popen:
        log = open(tmp_path / log_name, "wb")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log.close()
        processes.append(process)
        return process

    try:
        link = spawn([str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                      "--host", "127.0.0.1", "--port", str(link_port)], "superlink.log")
        wait_for_port(link_port, link, 60)
        for partition in (0, 1):
            spawn([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                   "--port", str(free_port()), "--max-wait-time", "120",
                   "--node-config", f"partition-id={partition} num-partitions=2"], f"supernode{partition}.log")
        (tmp_path / "flwr-home").mkdir(exist_ok=True)
        (tmp_path / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        yield env, link_port
    finally:
        for process in reversed(processes):
            stop(process)


def test_two_supernodes_two_rounds_via_flwr_run(federation: tuple[dict[str, str], int], tmp_path: Path) -> None:
    env, _ = federation
    out = tmp_path / "out"
    job = {"task": "toy", "task_config": TOY, "rounds": ROUNDS, "clients_per_round": 2, "min_clients": 2,
           "seed": 1, "output_dir": str(out), "round_timeout_s": 120, "startup_timeout_s": 120}
    overrides = tmp_path / "job.toml"
    overrides.write_text(f"job = '{json.dumps(job)}'\n")
    result = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "loopback", "--run-config", str(overrides),
                             "--stream"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    state = json.loads((out / "state.json").read_text())
    assert state["round"] == ROUNDS
    assert [(r["successes"], r["failures"], r["clients"]) for r in state["history"]] == [(2, 0, [0, 1])] * ROUNDS

    task = make_task(TOY)
    weights = task.initial_weights()
    for server_round in range(1, ROUNDS + 1):
        updates = [task.client_update(weights, c, server_round) for c in (0, 1)]
        total = sum(u.num_examples for u in updates)
        weights = {k: sum(u.weights[k] * (u.num_examples / total) for u in updates) for k in weights}
    saved = load_file(str(out / state["checkpoint"]))
    for name, tensor in weights.items():
        torch.testing.assert_close(saved[name], tensor, atol=1e-6, rtol=0)
