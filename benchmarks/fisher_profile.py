"""Profile fishertune's diagonal Fisher on one benchmark model (top operators by device / CPU time).

    python benchmarks/fisher_profile.py sasrec --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    from fisher_models import build

    from fishertune.fisher import diagonal_fisher

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    case = build(args.model, args.quick, args.device)
    diagonal_fisher(case.model, case.batches, likelihood=case.likelihood, progress=False)  # warm up
    acts = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        diagonal_fisher(case.model, case.batches, likelihood=case.likelihood, progress=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    key = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
