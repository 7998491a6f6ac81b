"""The recommender lab's benchmarks in one command (not part of the test suite).

    FISHERTUNE_DATA=../shared/datasets FISHERTUNE_PROGRESS=0 python benchmarks/recsys.py [--device cuda]

Prints, each beside a baseline measured in the same run: the leave-one-out split of ML-1M (vs a
per-user Python loop), full-ranking evaluation of all ML-1M users (vs a per-user loop, and RecBole's
evaluator when RecBole imports), the EASE fit on ML-1M (vs RecBole's EASE when it imports) and one
Mult-VAE epoch on ML-1M (vs a bare forward+backward of the same MLP).
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    for script, extra in (("bench_split.py", []), ("bench_eval.py", ["--device", args.device]),
                          ("bench_models.py", ["--device", args.device])):
        print(f"\n== {script} ==", flush=True)
        if args.device != "cpu" and script == "bench_split.py":
            print("(CPU only: the split runs in numpy)")
        sys.argv = [str(HERE / script), *extra] if script != "bench_split.py" else [str(HERE / script)]
        runpy.run_path(str(HERE / script), run_name="__main__")


if __name__ == "__main__":
    main()
