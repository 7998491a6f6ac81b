"""Reduction of Fisher sums and sample counts across ``torch.distributed`` ranks.

Each rank accumulates unnormalised sums on its own shard; one all-reduce of the sums and of the counts
makes N processes on disjoint shards equal one process on all the data (normalisation happens after).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sums(sums: dict[str, Tensor], counts: list[int]) -> list[int]:
    """Sum ``sums`` (in place, in a fixed name order) and ``counts`` over all ranks."""
    for name in sorted(sums):
        t = sums[name]
        # gloo has no fp16 all-reduce and NCCL wants device tensors: reduce a float32/64 copy if needed
        work = t if t.dtype in (torch.float32, torch.float64) else t.float()
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        if work is not t:
            t.copy_(work)
    backend = dist.get_backend()
    device = next(iter(sums.values())).device if (sums and backend == "nccl") else torch.device("cpu")
    c = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return [int(round(v)) for v in c.tolist()]
