"""Time per epoch of the sequential recommenders (SASRec with full cross-entropy, SASRec with
sampled-negative BCE, BERT4Rec) on an S3-Rec dataset, on CPU or CUDA.

Each model is trained for ``--epochs`` epochs through the project's loop (``fishertune.recsys.train``,
the presets' settings: hidden 64, 2 layers, 2 heads, max length 50, batch 256, Adam lr 1e-3; bf16
autocast on CUDA with ``--amp``) without validation, and the per-epoch training time is read from the
loop's history; the last epoch's is reported (the first carries one-off start-up costs on CUDA). One
full-ranking validation pass over every user (HR / NDCG at 10 and 20, MRR) is timed separately, so
"epoch + validation" is what one epoch of ``fishertune train`` costs.

Run (data through ``FISHERTUNE_DATA``; reads ``seq/Beauty.txt``, or ``Sports_and_Outdoors.txt`` /
``LastFM.txt`` with ``--dataset``):

    FISHERTUNE_DATA=... FISHERTUNE_PROGRESS=0 python benchmarks/sequential.py --device cpu --threads 2
    FISHERTUNE_DATA=... FISHERTUNE_PROGRESS=0 python benchmarks/sequential.py --device cuda --amp --epochs 3

``--out FILE.json`` keeps the numbers. CPU times depend on the cores free: note the load when quoting.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from fishertune.recsys.data import DataConfig, load_split
from fishertune.recsys.experiment import EvalConfig, evaluate_model
from fishertune.recsys.models import build_model
from fishertune.recsys.train import TrainConfig, train

MODELS = {
    "sasrec-ce": {"name": "sasrec", "loss": "ce", "dropout": 0.5},
    "sasrec-bce": {"name": "sasrec", "loss": "bce", "dropout": 0.5},
    "bert4rec": {"name": "bert4rec", "dropout": 0.2, "mask_prob": 0.2},
}
COMMON = {"hidden_size": 64, "num_layers": 2, "num_heads": 2, "max_len": 50}


def measure(split, key: str, device: str, epochs: int, amp: bool, batch_size: int) -> dict:
    model = build_model({**COMMON, **MODELS[key]}, split.n_users, split.n_items, seed=0)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=1e-3, device=device, amp=amp, patience=None,
                      monitor="ndcg@10", checkpoint_every=0)
    result = train(model, split, cfg, evaluate_fn=None, run_dir=None)
    times = [rec["train_seconds"] for rec in result.history]
    n_batches = -(-int((model.train_seqs > 0).sum(1).ge(2).sum()) // batch_size)
    ecfg = EvalConfig(protocol="full", ks=[10, 20], metrics=["hr", "ndcg", "mrr"], batch_size=2048)
    dev = next(model.parameters()).device
    evaluate_model(model, split, "valid", ecfg, device=dev)  # warm-up
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    metrics = evaluate_model(model, split, "valid", ecfg, device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    eval_s = time.perf_counter() - t0
    return {"model": key, "device": str(dev), "amp": amp and dev.type == "cuda", "batches": n_batches,
            "epoch_seconds": times, "epoch_s": times[-1], "valid_eval_s": eval_s,
            "epoch_plus_valid_s": times[-1] + eval_s, "final_loss": result.history[-1]["train"]["loss"],
            "valid_ndcg@10_after": metrics["ndcg@10"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="beauty", choices=["beauty", "sports", "lastfm"])
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    split, _ = load_split(DataConfig(name=args.dataset, split={"protocol": "leave_one_out"}))
    print(f"{args.dataset}: {split.n_users:,} users x {split.n_items:,} items; torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() and args.device != "cpu" else ""))
    rows = []
    for key in keys:
        row = measure(split, key, args.device, args.epochs, args.amp, args.batch_size)
        rows.append(row)
        print(f"  {key}: {row['epoch_seconds']}", flush=True)
    print()
    print(f"| {args.dataset} | device | batches / epoch | s / epoch (last of {args.epochs}) | full-ranking "
          "validation s | epoch + validation s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        dev = r["device"] + (" bf16" if r["amp"] else "")
        print(f"| {r['model']} | {dev} | {r['batches']} | {r['epoch_s']:.2f} | {r['valid_eval_s']:.2f} | "
              f"{r['epoch_plus_valid_s']:.2f} |")
    if args.out:
        from fishertune.utils.io import atomic_write_json

        atomic_write_json(args.out, {"dataset": args.dataset, "threads": torch.get_num_threads(),
                                     "load_average": os.getloadavg()[0], "rows": rows})


if __name__ == "__main__":
    main()
