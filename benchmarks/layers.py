"""Layer importance and compression plans on the three real models of issue 7 (one command each).

    # 1. MiniLM on STS-B (calibration: STS-B train; evaluation: STS-B test), 2 and 3 of 6 layers removed
    FISHERTUNE_DATA=../shared/datasets python benchmarks/layers.py minilm --out runs/layers/minilm
    # 2. ResNet-56 on JPEG CIFAR-10 (calibration: JPEG train5k; evaluation: the 10,000 JPEG test images)
    FISHERTUNE_DATA=../shared/datasets python benchmarks/layers.py resnet --out runs/layers/resnet56
    # 3. SASRec on Beauty: train, then 1 of 2 blocks removed (NDCG@10 on test; calibration: training sequences)
    FISHERTUNE_DATA=../shared/datasets fishertune train configs/beauty-sasrec.yaml --run-dir runs/beauty-sasrec
    FISHERTUNE_DATA=../shared/datasets python benchmarks/layers.py sasrec --run-dir runs/beauty-sasrec --out runs/layers/sasrec

Each writes results.md / summary.md / results.csv / kept.png / scores.* (see docs/layers.md). The SASRec
adapter lives here (not in the core, which never imports fishertune.recsys): ``fishertune compress
benchmarks/layers.py:sasrec_task --set run_dir=... --remove 1`` is the same measurement through the CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from fishertune.layers import LayerTask


class NextItem(nn.Module):
    """A SASRec as a per-position next-item classifier: ``forward(seqs) -> (B, T, n_items)`` logits."""

    def __init__(self, sasrec: nn.Module) -> None:
        super().__init__()
        self.m = sasrec

    def forward(self, seqs: Tensor, last_only: bool = False) -> Tensor:
        h = self.m.encode(seqs)
        return (h[:, -1] if last_only else h) @ self.m.item_weights().T


def sasrec_task_from_model(model, split, eval_cfg, *, calib_users: int = 1024, calib_batch: int = 64,
                           seed: int = 0, stage: str = "test", latency_batch: int = 256,
                           calib_metric: str = "loss", device: str = "cpu") -> LayerTask:
    """Calibration: the training sequences of ``calib_users`` seeded users (next-item cross-entropy
    over all items at every position); evaluation: ``stage`` of the split with ``eval_cfg``.

    ``calib_metric`` is what the ablation analysers score: ``"loss"`` (minus that cross-entropy) or
    ``"valid"`` (NDCG@10 on the validation stage: held-out targets, never the evaluation stage)."""
    if calib_metric not in ("loss", "valid"):
        raise ValueError(f"calib_metric must be 'loss' or 'valid', got {calib_metric!r}")
    if calib_metric == "valid" and stage == "valid":
        raise ValueError("calib_metric='valid' needs an evaluation stage other than 'valid'")
    from fishertune.recsys.experiment import evaluate_model

    model = model.to(device).eval()
    if not model.prepared:
        model.prepare(split)
    seqs = model.train_seqs
    users = np.flatnonzero((seqs > 0).sum(1).cpu().numpy() >= 2)
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(users, size=min(calib_users, len(users)), replace=False))
    batches = []
    for s in range(0, len(users), calib_batch):
        u = torch.from_numpy(users[s:s + calib_batch]).to(seqs.device)
        inp, nxt = seqs[u, :-1], seqs[u, 1:]
        target = torch.where((nxt > 0) & (inp > 0), nxt - 1, torch.full_like(nxt, -100))
        batches.append((inp, target))
    wrapper = NextItem(model).eval()

    def eval_metric(m: nn.Module) -> float:
        return float(evaluate_model(m.m, split, stage, eval_cfg, device=device)["ndcg@10"])

    def valid_metric(m: nn.Module) -> float:
        return float(evaluate_model(m.m, split, "valid", eval_cfg, device=device)["ndcg@10"])

    lat = batches[0][0][:latency_batch]
    return LayerTask(wrapper, batches, likelihood="categorical", eval_metric=eval_metric, metric_name="ndcg@10",
                     calib_metric=valid_metric if calib_metric == "valid" else None,
                     token_mask=lambda batch: batch[0] > 0, latency_inputs=(lat, True), spec="sasrec",
                     info={"calib": f"training sequences of {len(users)} users (seed {seed})"
                                    + ("; ablations score validation NDCG@10" if calib_metric == "valid" else ""),
                           "eval": f"{stage} stage, full ranking", "latency": f"scoring {len(lat)} sequences (last position)"})


def sasrec_task(run_dir: str, **kw) -> LayerTask:
    """The SASRec of a finished ``fishertune train`` run directory (its best checkpoint)."""
    from fishertune.recsys.runs import load_run

    run = load_run(run_dir)
    task = sasrec_task_from_model(run.model, run.split, run.cfg.eval, **kw)
    task.spec = f"sasrec ({run_dir})"
    return task


def main(argv: list[str] | None = None) -> int:
    from fishertune.layers.report import DEFAULT_METHODS, compare_plans, summary_frame
    from fishertune.layers.tasks import minilm_task, resnet_task

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["minilm", "resnet", "sasrec"])
    p.add_argument("--out", required=True)
    p.add_argument("--run-dir", help="sasrec: the trained run directory")
    p.add_argument("--calib", type=int, help="calibration size (pairs / images / users)")
    p.add_argument("--eval-per-class", type=int, help="resnet: test images per class (default all 1,000)")
    p.add_argument("--remove", help="comma-separated counts (default: 2,3 / 3,6,9,13 / 1)")
    p.add_argument("--methods", help="comma-separated (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu", help="device for calibration and evaluation (e.g. cuda)")
    p.add_argument("--latency-device", default="cpu", help="device the latency is timed on (default cpu)")
    p.add_argument("--calib-metric", default="loss", choices=["loss", "valid"],
                   help="sasrec: what ablations score (calibration loss, or validation NDCG@10)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.which == "minilm":
        task = minilm_task(calib=args.calib or 512, calib_batch=32, device=args.device)
        counts = [2, 3]
    elif args.which == "resnet":
        task = resnet_task(56, calib=args.calib or 1000, eval_per_class=args.eval_per_class, device=args.device)
        counts = [3, 6, 9, 13]
    else:
        if not args.run_dir:
            p.error("sasrec needs --run-dir (train first: fishertune train configs/beauty-sasrec.yaml --run-dir DIR)")
        task = sasrec_task(args.run_dir, calib_users=args.calib or 1024, calib_metric=args.calib_metric,
                           device=args.device)
        counts = [1]
    if args.remove:
        counts = [int(k) for k in args.remove.split(",")]
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    frame = compare_plans(task, methods, counts=counts, random_draws=5, out=args.out, repeats=args.repeats,
                          threads=args.threads, latency_device=args.latency_device)
    print(f"dense {task.metric_name}: {frame.attrs['dense_metric']:.4f}")
    print(summary_frame(frame).to_string())
    print(f"wrote {Path(args.out) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
