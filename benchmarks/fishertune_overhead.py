"""Time per epoch with FisherTune / without, on a toy embedding + MLP model (synthetic data).

The baseline is the same model and optimizer groups trained with ``use_fishertune=false``. FisherTune
runs its default protocol (warm-up, then element-wise masks, Fisher and perturbed Fisher every
``fim_update_freq`` epochs, so the Fisher passes are amortised), optionally with every feature on.
Reported: mean seconds per epoch over the timed epochs (warm-up epochs included for both), and the
ratio. Target: <= 1.2x. Baseline and FisherTune train side by side with their epochs interleaved
(the machine's load drifts over both alike); ``--repeats N`` makes N such pairs and reports the
median of the per-pair ratios; ``--clock cpu`` times with the process' CPU
time instead of the wall clock (with one thread on a shared, overloaded CPU the wall clock mostly
measures the other processes; CPU time does not see them; use the wall clock on the GPU).

Run: ``python benchmarks/fishertune_overhead.py [--device cuda] [--items 200000] [--epochs 12]
[--preset default|all_features|speed] [--fisher engine|batch] [--repeats 3] [--clock wall|cpu]``
"""

from __future__ import annotations

import argparse
import statistics
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
    ap.add_argument("--repeats", type=int, default=1, help="interleaved baseline / FisherTune pairs")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = ap.parse_args()
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
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

    def setup(cfg: FisherTuneConfig):
        torch.manual_seed(0)
        model = Toy(args.items, args.dim, 2).to(dev)
        fn = engine_fisher("categorical") if args.fisher == "engine" else batch_gradient_fisher(loss_fn)
        tuner = FisherTuner(model, cfg, {"shared": ["emb.*", "enc.*"], "specific": ["heads.*"]}, fn,
                            lambda: data[:args.fisher_batches], log=None, total_epochs=args.epochs)
        return model, tuner, tuner.make_optimizer("adam")

    def epoch(state, e: int) -> tuple[float, bool]:
        model, tuner, opt = state
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        tuner.on_epoch_start(e)
        for b in data:
            opt.zero_grad(set_to_none=True)
            (loss_fn(model, b) + tuner.penalty()).backward()
            tuner.before_step(batch_size=args.batch)
            opt.step()
            tuner.after_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = clock() - t0
        return dt, tuner.on_epoch_end(e, {"valid_loss": -e})["fisher_updated"]

    def run(base: FisherTuneConfig, cfg: FisherTuneConfig) -> tuple[tuple[float, float], tuple[float, float]]:
        """Baseline and FisherTune trained side by side, epochs interleaved (order alternating), so
        that the machine's load drifts over both alike. ``(mean, mean over epochs without a Fisher
        update)`` seconds per epoch for each; the same epochs are averaged for both."""
        sb, sf = setup(base), setup(cfg)
        tb, tf, updated = [], [], []
        for e in range(args.epochs):
            if e % 2 == 0:
                tb.append(epoch(sb, e)[0])
                dt, up = epoch(sf, e)
            else:
                dt, up = epoch(sf, e)
                tb.append(epoch(sb, e)[0])
            tf.append(dt)
            updated.append(up)
        steady = [i for i, u in enumerate(updated) if not u] or list(range(args.epochs))

        def stats(ts: list[float]) -> tuple[float, float]:
            return sum(ts) / len(ts), sum(ts[i] for i in steady) / len(steady)

        return stats(tb), stats(tf)

    over = {"fishertune_warmup": 2, "fim_update_freq": 5}
    base_cfg = preset_config("baseline", **over)
    body = {"perturbation_modules": ["enc"]}
    cfg = preset_config(args.preset, **over, **body)
    if cfg.perturbation_type in ("edge_dropout", "popularity"):
        cfg = cfg.model_copy(update={"perturbation_type": "noise"})   # recsys-only types: the core's stand-in
    warm = setup(base_cfg)
    for e in range(2):                            # warm caches / allocator once
        epoch(warm, e)
    pairs = [run(base_cfg, cfg) for _ in range(args.repeats)]
    med = statistics.median
    t_base = med(b[0] for b, _ in pairs)
    t_ft, s_ft = med(f[0] for _, f in pairs), med(f[1] for _, f in pairs)
    ratio = med(f[0] / b[0] for b, f in pairs)
    ratio_s = med(f[1] / b[1] for b, f in pairs)
    print(f"device={dev} items={args.items} dim={args.dim} samples={args.samples} batch={args.batch} "
          f"epochs={args.epochs} preset={args.preset} fisher={args.fisher} perturbation={cfg.perturbation_type} "
          f"clock={args.clock} repeats={args.repeats}")
    print(f"baseline   {t_base:.3f} s/epoch")
    print(f"fishertune {t_ft:.3f} s/epoch (epochs without a Fisher update: {s_ft:.3f} s)")
    if args.repeats > 1:
        print("pair ratios " + " ".join(f"{f[0] / b[0]:.3f}" for b, f in pairs))
    print(f"ratio {ratio:.3f}x over all epochs (target <= 1.2x); {ratio_s:.3f}x for epochs without "
          "a Fisher update (the per-step cost of masks, penalty, preconditioning)")


if __name__ == "__main__":
    main()
