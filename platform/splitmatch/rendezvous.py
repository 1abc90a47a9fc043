"""Where the Ray Train workers' process group meets: Ray Train's own set-up, except on a node that
listens on 127.0.0.1 only.

Ray Train has rank 0 host PyTorch's rendezvous store (a TCPStore) on a free port of MASTER_ADDR,
its node's address. PyTorch's store listens on every interface whatever that address is (it binds
the wildcard address unless it is handed a bound socket), and gloo listens on whatever address
the machine's hostname resolves to. On the local instance that `init_ray` starts, where the rest
of Ray listens on 127.0.0.1 only, those would be the ports open to the network: there rank 0
serves the store on a socket bound to 127.0.0.1 and gloo listens on the loopback interface. The
nodes of a cluster the user joins keep Ray Train's set-up unchanged.
"""
from __future__ import annotations

import datetime
import os
import socket
import sys

import ray
import torch.distributed as dist
from ray.train.torch import TorchConfig
from ray.train.torch.config import (_set_torch_distributed_env_vars, _setup_torch_process_group,
                                    _TorchBackend)

LOOPBACK = "127.0.0.1"
_store = None  # rank 0's store, kept for the process group that reuses it


class LoopbackTorchConfig(TorchConfig):
    """TorchTrainer's `torch_config`: Ray Train's defaults, with the rendezvous above."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig) -> None:
        if worker_group.execute_single(0, ray.util.get_node_ip_address) != LOOPBACK:
            super().on_start(worker_group, backend_config)
            return
        # What Ray Train's on_start does, with rank 0's store started first: the process group
        # that Ray Train's own set-up then makes on rank 0 finds it (same process, same port:
        # `multi_tenant`) instead of binding its own to every interface.
        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")  # as Ray Train does
        port = worker_group.execute_single(0, _serve_store, backend_config.timeout_s)
        worker_group.execute(_point_at_store, port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend, world_rank=rank,
            world_size=len(worker_group), init_method="env://", timeout_s=backend_config.timeout_s)
            for rank in range(len(worker_group))])


def _serve_store(timeout_s: int) -> int:
    """Rank 0: start the store on a socket bound to 127.0.0.1; returns its port."""
    global _store
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    port = listener.getsockname()[1]
    _store = dist.TCPStore(LOOPBACK, port, is_master=True, multi_tenant=True,
                           master_listen_fd=listener.detach(), wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    return port


def _point_at_store(port: int) -> None:
    os.environ.update(MASTER_ADDR=LOOPBACK, MASTER_PORT=str(port))
    # gloo's own connections between ranks; a user's choice stands. (NCCL, on GPU workers, picks
    # its bootstrap interface by NCCL_SOCKET_IFNAME, left to the user: not checked without GPUs.)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo0" if sys.platform == "darwin" else "lo")
