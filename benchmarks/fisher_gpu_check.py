"""CUDA correctness check of the Fisher engine: a transformer-ish model with an embedding, attention,
layer norms, a conv and a tied output on the GPU (float32, and bf16 autocast) against float64 on CPU.

    python benchmarks/fisher_gpu_check.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))


class Net(nn.Module):
    def __init__(self, V=500, d=32):
        super().__init__()
        self.emb = nn.Embedding(V, d, padding_idx=0)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.conv = nn.Conv1d(d, d, 3, padding=1)
        self.bias = nn.Parameter(torch.zeros(V))

    def forward(self, x):
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return h[:, -1] @ self.emb.weight.t() + self.bias  # tied output layer: torch.func path


def main() -> int:
    from fishertune.fisher import diagonal_fisher

    torch.manual_seed(0)
    model = Net().double()
    x = torch.randint(1, 500, (96, 12))
    y = torch.randint(0, 500, (96,))
    batches = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 96, 32)]
    ref = diagonal_fisher(model, batches, progress=False)
    print("paths:", ref.paths)
    gpu = model.float().cuda()
    gb = [(a.cuda(), b.cuda()) for a, b in batches]
    for label, kw in [("cuda fp32", {}), ("cuda bf16 autocast", {"autocast_dtype": torch.bfloat16})]:
        res = diagonal_fisher(gpu, gb, progress=False, **kw)
        worst = max(float((res[n].double().cpu() - ref[n]).abs().max() / ref[n].abs().max().clamp_min(1e-30))
                    for n in ref.keys())
        print(f"{label}: max relative error vs CPU float64 = {worst:.2e}; dtypes {set(str(v.dtype) for v in res.values())}")
        if label == "cuda fp32" and worst > 1e-3:
            print("FAILED")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
