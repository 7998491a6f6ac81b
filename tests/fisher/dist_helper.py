"""Run by test_distributed.py in a fresh interpreter: fork 2 gloo ranks from a parent that has not
started any thread pool yet (forking a busy test process can deadlock)."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 3)).double()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 7, (10, 3), generator=g), torch.randint(0, 3, (10,), generator=g)


def worker(rank: int, world: int, port: int, out: str, empty: bool) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FISHERTUNE_PROGRESS="0")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from fishertune.fisher import diagonal_fisher

        x, y = data()
        if empty:  # rank 1 has no data at all; it must still join the reduction
            shard = slice(0, 10) if rank == 0 else slice(10, 10)
        else:
            shard = slice(0, 6) if rank == 0 else slice(6, 10)  # unequal shards on purpose
        xs, ys = x[shard], y[shard]
        batches = [(xs[i:i + 4], ys[i:i + 4]) for i in range(0, len(ys), 4)]
        res = diagonal_fisher(model(), batches, progress=False)
        torch.save({"fisher": dict(res.items()), "n": res.n_samples, "batches": res.n_batches}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    mp.start_processes(worker, args=(2, free_port(), sys.argv[1], sys.argv[2:] == ["empty"]), nprocs=2, join=True,
                       start_method="fork")
