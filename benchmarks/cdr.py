"""Time per epoch of the cross-domain model: without FisherTune, with it (default preset), and without
data loading (the same steps on batches made beforehand). Target: FisherTune <= 1.2x the baseline.

    FISHERTUNE_DATA=../shared/datasets python benchmarks/cdr.py                      # CPU, 40 steps
    FISHERTUNE_DATA=... python benchmarks/cdr.py --device cuda --amp --steps 0      # a whole epoch on the GPU

FisherTune's epoch = masked training steps + its Fisher estimate (two passes over ``fisher_batches``
steps, F(x) and F(x')) amortised over ``fim_update_freq`` epochs. ``--steps N`` times the first N steps
of an epoch and scales to a full one (0: the whole epoch).
"""

from __future__ import annotations

import argparse
import time

import torch

from fishertune.recsys.cdr.config import load_cdr_config
from fishertune.recsys.cdr.train import _make_tuner, build_context
from fishertune.tune import load_presets


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(ctx, opt, tuner, batches, amp: bool) -> float:
    """Seconds for the given steps (a list of per-domain batch lists, or an iterator)."""
    model = ctx.model
    model.train()
    _sync(ctx.device)
    t0 = time.perf_counter()
    for step in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and ctx.device.type == "cuda"):
            loss = sum(model.loss_terms(b)["loss"] for b in step)
        if tuner.enabled:
            loss = loss + tuner.penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tuner.before_step(len(step[0]))
        opt.step()
        tuner.after_step()
    _sync(ctx.device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cdr/sport_cloth.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per epoch (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    over = [f"train.device={args.device}", f"train.amp={str(args.amp).lower()}", *args.overrides]
    base_cfg = load_cdr_config(args.config, over, preset=load_presets()["baseline"])
    ft_cfg = load_cdr_config(args.config, [*over, "fishertune.fishertune_warmup=0"], preset=load_presets()["default"])
    ctx = build_context(base_cfg)
    n_epoch = len(ctx.sampler)
    n = n_epoch if args.steps <= 0 else min(args.steps, n_epoch)
    scale = n_epoch / n
    gen = lambda s: torch.Generator(ctx.device).manual_seed(s)

    def take(it, k):
        return [next(it) for _ in range(k)]

    # baseline: sampling on the fly, then the same steps on batches made beforehand
    tuner = _make_tuner(ctx, 0, lambda m: None)
    opt = tuner.make_optimizer("adam", foreach=True if ctx.device.type == "cpu" else None)
    _steps(ctx, opt, tuner, take(ctx.sampler.epoch(gen(99)), min(3, n)), args.amp)  # warm-up (allocations, kernels)
    import itertools
    t_base = _steps(ctx, opt, tuner, itertools.islice(ctx.sampler.epoch(gen(1)), n), args.amp) * scale
    cached = take(ctx.sampler.epoch(gen(2)), n)
    t_noload = _steps(ctx, opt, tuner, cached, args.amp) * scale

    # FisherTune (default preset): tuning from the first epoch; Fisher estimate timed on its own
    ctx.cfg = ft_cfg
    tuner = _make_tuner(ctx, 0, lambda m: None)
    opt = tuner.make_optimizer("adam", foreach=True if ctx.device.type == "cpu" else None)
    _sync(ctx.device)
    t0 = time.perf_counter()
    tuner.on_epoch_start(1)  # Fisher on x and x' + masks
    _sync(ctx.device)
    t_fisher = time.perf_counter() - t0
    t_ft_steps = _steps(ctx, opt, tuner, itertools.islice(ctx.sampler.epoch(gen(1)), n), args.amp) * scale
    freq = ft_cfg.fishertune.fim_update_freq
    t_ft = t_ft_steps + t_fisher / freq
    ratio = tuner.mask.ratio()
    print(f"{base_cfg.data.task} {base_cfg.data.domains} on {ctx.device} (amp {args.amp}): {n_epoch} steps/epoch "
          f"of {base_cfg.train.batch_size} per domain, {sum(p.numel() for p in ctx.model.parameters()):,} parameters"
          + (f", timed {n} steps and scaled" if n < n_epoch else ""))
    print(f"  baseline epoch                 {t_base:8.3f} s")
    print(f"  baseline epoch, no data loading {t_noload:7.3f} s  (batch sampling = {t_base - t_noload:.3f} s)")
    print(f"  FisherTune steps (masked, {100 * ratio:.1f}% active) {t_ft_steps:8.3f} s")
    print(f"  Fisher estimate (x and x')     {t_fisher:8.3f} s, every {freq} epochs")
    print(f"  FisherTune epoch (amortised)   {t_ft:8.3f} s")
    print(f"  ratio FisherTune / baseline    {t_ft / t_base:8.3f}x  (target <= 1.2x)")


if __name__ == "__main__":
    main()
