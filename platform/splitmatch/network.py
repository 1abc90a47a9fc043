"""Ports for the servers this project starts (an MLflow server, a Ray node in tests)."""
from __future__ import annotations

import random
import socket
from pathlib import Path


_PORTS_GIVEN: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on `host` now and that this process has not handed out before.

    Drawn below the OS's ephemeral range: asking the OS for port 0 twice in a row can give the
    same port twice (a Ray node was once started with its GCS and node manager on one port), and a
    port of that range can be taken, between choosing and binding, by an outgoing connection or by
    a Ray worker whose port the OS picks."""
    low = ephemeral_ports_start()
    draw = random.SystemRandom()  # not the seeded module state: two processes would draw alike
    for _ in range(200):
        port = draw.randrange(20000, low) if low > 21000 else 0
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            port = sock.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
    raise OSError(f"no free port found on {host}")


def ephemeral_ports_start() -> int:
    try:  # Linux; elsewhere the OS picks (port 0)
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
