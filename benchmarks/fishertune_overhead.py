"""Time per epoch with FisherTune / without, on a toy embedding + MLP model (synthetic data).

The baseline is the same model and optimizer groups trained with ``use_fishertune=false``. FisherTune
runs its default protocol (warm-up, then element-wise masks, Fisher and perturbed Fisher every
``fim_update_freq`` epochs, so the Fisher passes are amortised), optionally with every feature on.
Reported: mean seconds per epoch over the timed epochs (warm-up epochs included for both), and the
ratio. Target: <= 1.2x for the default settings.

Run: ``python benchmarks/fishertune_overhead.py [--device cuda] [--items 200000] [--epochs 12]
[--preset default|all_features|speed] [--fisher engine|batch]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from fishertune.tune import FisherTuneConfig, FisherTuner, batch_gradient_fisher, engine_fisher, preset_config


class Toy(nn.Module):
    def __init__(self, items: int, dim: int, domains: int):
        super().__init__()
        self.emb = nn.Embedding(items, dim)
        self.enc = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.heads = nn.ModuleList([nn.Linear(dim, 64) for _ in range(domains)])

    def forward(self, hist: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(hist).mean(1))
        out = torch.stack([head(h) for head in self.heads], 1)
        return out[torch.arange(hist.shape[0], device=hist.device), dom]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32_768)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--fisher", choices=["engine", "batch"], default="engine")
    ap.add_argument("--fisher-batches", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(0, args.items, (args.samples, 20), generator=g).to(dev)
    dom = torch.randint(0, 2, (args.samples,), generator=g).to(dev)
    y = (hist[:, 0] % 64).to(dev)
    nb = args.samples // args.batch
    data = [((hist[i * args.batch:(i + 1) * args.batch], dom[i * args.batch:(i + 1) * args.batch]),
             y[i * args.batch:(i + 1) * args.batch]) for i in range(nb)]

    def loss_fn(model, batch):
        (h, d), t = batch
        return nn.functional.cross_entropy(model(h, d), t)

    def run(cfg: FisherTuneConfig) -> tuple[float, float]:
        torch.manual_seed(0)
        model = Toy(args.items, args.dim, 2).to(dev)
        fn = engine_fisher("categorical") if args.fisher == "engine" else batch_gradient_fisher(loss_fn)
        tuner = FisherTuner(model, cfg, {"shared": ["emb.*", "enc.*"], "specific": ["heads.*"]}, fn,
                            lambda: data[:args.fisher_batches], log=None, total_epochs=args.epochs)
        opt = tuner.make_optimizer("adam")
        times, steady = [], []
        for epoch in range(args.epochs):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            tuner.on_epoch_start(epoch)
            for b in data:
                opt.zero_grad(set_to_none=True)
                (loss_fn(model, b) + tuner.penalty()).backward()
                tuner.before_step(batch_size=args.batch)
                opt.step()
                tuner.after_step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            row = tuner.on_epoch_end(epoch, {"valid_loss": -epoch})
            if not row["fisher_updated"]:
                steady.append(times[-1])
        return sum(times) / len(times), sum(steady) / max(1, len(steady))

    over = {"fishertune_warmup": 2, "fim_update_freq": 5}
    base_cfg = preset_config("baseline", **over)
    body = {"perturbation_modules": ["enc"]}
    cfg = preset_config(args.preset, **over, **body)
    if cfg.perturbation_type in ("edge_dropout", "popularity"):
        cfg = cfg.model_copy(update={"perturbation_type": "noise"})   # recsys-only types: the core's stand-in
    run(base_cfg)                                 # warm caches / allocator once
    t_base, s_base = run(base_cfg)
    t_ft, s_ft = run(cfg)
    print(f"device={dev} items={args.items} dim={args.dim} samples={args.samples} batch={args.batch} "
          f"epochs={args.epochs} preset={args.preset} fisher={args.fisher} perturbation={cfg.perturbation_type}")
    print(f"baseline   {t_base:.3f} s/epoch")
    print(f"fishertune {t_ft:.3f} s/epoch (epochs without a Fisher update: {s_ft:.3f} s)")
    print(f"ratio {t_ft / t_base:.3f}x over all epochs (target <= 1.2x); {s_ft / s_base:.3f}x for epochs without "
          "a Fisher update (the per-step cost of masks, penalty, preconditioning)")


if __name__ == "__main__":
    main()
