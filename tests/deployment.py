"""A real Flower deployment on loopback for tests: one SuperLink, SuperNodes, and the ``flwr`` CLI.

The flags are the ones docs/federation.md gives for a deployment. Without ``tls`` everything runs
``--insecure``; with it the SuperLink serves TLS and admits only SuperNodes whose public key was
registered through ``flwr supernode register`` (``--enable-supernode-auth``, Flower 1.42).
Every process is started in its own session so that ``stop`` can kill its whole process group
(SuperExec and app children included); logs go to ``<directory>/<name>.log``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pki import TlsFiles, make_supernode_key

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "loopback"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing holds now, drawn at random below Linux's ephemeral range (32768 and up), where the kernel itself
    picks ports for outgoing connections and for ``bind(0)``: a port found free there is not taken by the kernel
    before our process binds it, and this session never hands one out twice. ``loopback`` still retries when the
    SuperLink finds its port taken (another program on the machine may bind it first)."""
    draw = random.Random()
    for _ in range(1000):
        port = draw.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port between 20000 and 32000 on 127.0.0.1")


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


@dataclass
class Loopback:
    """A running SuperLink on 127.0.0.1, the processes started against it, and the ``flwr`` environment."""

    directory: Path
    link_port: int
    tls: TlsFiles | None
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    registered_nodes: set[int] = field(default_factory=set)

    def spawn(self, args: list[str], name: str) -> subprocess.Popen:
        with open(self.directory / f"{name}.log", "wb") as log:
            process = subprocess.Popen(args, env=self.env, cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.processes.append(process)
        return process

    def log(self, name: str) -> str:
        return (self.directory / f"{name}.log").read_text(errors="replace")

    def flwr(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "flwr"), *args], env=self.env, cwd=self.directory, capture_output=True,
                              text=True, timeout=timeout_s)

    def start_supernode(self, name: str, node_config: str, *, auth_key: Path | None = None, plaintext: bool = False,
                        extra: tuple[str, ...] = ()) -> subprocess.Popen:
        """A SuperNode dialling the link over TLS when the link has it, unless ``plaintext``."""
        transport = ["--insecure"] if plaintext or self.tls is None else ["--root-certificates", str(self.tls.ca_cert)]
        auth = ["--auth-supernode-private-key", str(auth_key)] if auth_key else []
        return self.spawn([str(BIN / "flower-supernode"), *transport, "--superlink", f"127.0.0.1:{self.link_port}",
                           *auth, "--port", str(free_port()), "--node-config", node_config, *extra], name)

    def register(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink and remember the node id it will get."""
        result = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        self.registered_nodes.add(int(json.loads(result.stdout)["node-id"]))

    def state_dir(self, partition: int) -> Path:
        """The folder where partition ``partition``'s SuperNode keeps its clients' own state."""
        return self.directory / f"supernode{partition}-state"

    def add_partition_node(self, partition: int, num_partitions: int) -> None:
        """One task client's SuperNode with its own state folder; on an authenticating link its fresh key pair is
        registered first."""
        name = f"supernode{partition}"
        key = None
        if self.tls is not None:
            key, public_key = make_supernode_key(self.directory, name)
            self.register(public_key)
        node_config = f'partition-id={partition} num-partitions={num_partitions} state-dir="{self.state_dir(partition)}"'
        self.start_supernode(name, node_config, auth_key=key, extra=("--max-wait-time", "120"))

    def online_nodes(self) -> set[int]:
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json")
        assert result.returncode == 0, result.stdout + result.stderr
        return {int(node["node-id"]) for node in json.loads(result.stdout)["nodes"] if node["status"] == "online"}

    def wait_for_online_nodes(self, count: int, timeout_s: float) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while len(online := self.online_nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(online)} of {count} SuperNodes online after {timeout_s}s")
            time.sleep(0.5)
        return online


def superlink_transport_flags(tls: TlsFiles | None) -> list[str]:
    if tls is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]


def write_connection(flwr_home: Path, link_port: int, tls: TlsFiles | None) -> None:
    """The ``$FLWR_HOME/config.toml`` through which ``flwr`` reaches the link (Flower 1.42 keeps it there)."""
    security = "insecure = true" if tls is None else f'root-certificates = "{tls.ca_cert}"'
    flwr_home.mkdir(exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\n{security}\n'
    )


@contextmanager
def loopback(directory: Path, tls: TlsFiles | None = None) -> Iterator[Loopback]:
    """Start a SuperLink (TLS and SuperNode authentication when ``tls`` is given); stop everything on exit."""
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(directory / "flwr-home"),
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    for attempt in range(3):  # another program may bind the port between the draw and the SuperLink's start
        link = Loopback(directory, free_port(), tls, env)
        write_connection(directory / "flwr-home", link.link_port, tls)
        superlink = link.spawn([str(BIN / "flower-superlink"), *superlink_transport_flags(tls),
                                "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                                "--port", str(link.link_port)], "superlink")
        try:
            wait_for_port(link.link_port, superlink, 60)
            break
        except RuntimeError:  # it exited: its log says why; a taken port is worth another draw
            stop(superlink)
            if attempt == 2:
                raise RuntimeError(f"the SuperLink did not start:\n{link.log('superlink')}") from None
    try:
        yield link
    finally:
        for process in reversed(link.processes):
            stop(process)
