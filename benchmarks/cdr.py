"""Time per epoch of the cross-domain model: without FisherTune, with it (default preset), and without
data loading (the same steps on batches made beforehand). Target: FisherTune <= 1.2x the baseline.

    FISHERTUNE_DATA=../shared/datasets python benchmarks/cdr.py                      # CPU, 40 steps
    FISHERTUNE_DATA=... python benchmarks/cdr.py --device cuda --amp --steps 0      # a whole epoch on the GPU

FisherTune's epoch = masked training steps + its Fisher estimate (two passes over ``fisher_batches``
steps, F(x) and F(x'), with DR-FIM and the importance ranks) amortised over ``fim_update_freq`` epochs,
timed warm (median of the repeats; the first, cold estimate is printed beside it, and with ``--amp`` on
CUDA one under bfloat16 autocast). ``--steps N`` times the first N steps
of an epoch and scales to a full one (0: the whole epoch); ``--repeats R`` times baseline and FisherTune
alternately R times and reports medians. The last line splits a step, with device syncs around each
part, into forward + backward and optimizer step (with FisherTune's masks and hooks): where the
overhead goes.

    FISHERTUNE_DATA=... python benchmarks/cdr.py --device cuda --amp --steps 0 --repeats 3

``--sync-debug`` lists where the host waits for the device (CUDA's sync debug mode, by source line) in
5 steps of each and one Fisher estimate; on the CPU, the tensor-to-Python reads that would wait on CUDA. ``--profile K`` adds torch.profiler tables of K steps of each (the ops with the most self time on the
host, and on CUDA on the device) and the kernel launches per step.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time
import warnings
from collections import Counter
from statistics import median

import torch

from fishertune.recsys.cdr.config import load_cdr_config
from fishertune.recsys.cdr.perturb import fisher_fn_for
from fishertune.recsys.cdr.train import _autocast, _make_tuner, _monitor, build_context, train_step
from fishertune.tune import load_presets
from fishertune.utils.readbacks import ReadBacks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _steps(ctx, opt, tuner, batches) -> float:
    """Seconds for the trainer's steps on the given batches (a list of per-domain batch lists, or an iterator)."""
    ctx.model.train()
    _sync(ctx.device)
    t0 = time.perf_counter()
    for step in batches:
        train_step(ctx, opt, tuner, step)
    _sync(ctx.device)
    return time.perf_counter() - t0


def _step_costs(ctx, opt, tuner, batches) -> tuple[float, float]:
    """Seconds in (forward + backward, optimizer step with the tuner's hooks) over ``batches``, each
    part fenced by device syncs: slower than :func:`_steps` in total, but it says where the time goes."""
    ctx.model.train()
    marks: list[float] = []

    def mark() -> None:
        _sync(ctx.device)
        marks.append(time.perf_counter())

    fb = st = 0.0
    for step in batches:
        mark()
        train_step(ctx, opt, tuner, step, after_backward=mark)
        mark()
        t0, t1, t2 = marks[-3:]
        fb, st = fb + t1 - t0, st + t2 - t1
    return fb, st


def _validation(ctx) -> float:
    """Seconds of one validation pass (both domains), as the trainer makes it after the first epoch."""
    _monitor(ctx)               # the first pass also checks the fixed negatives
    _sync(ctx.device)
    t0 = time.perf_counter()
    _monitor(ctx)
    _sync(ctx.device)
    return time.perf_counter() - t0


def _profile(ctx, work, n: int, label: str, unit: str = "step", rows: int = 12) -> None:
    """torch.profiler over ``work()`` (``n`` units of work): the top ops by self time, and launches per unit."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        work()
    ev = prof.key_averages()
    launches = sum(e.count for e in ev if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    print(f"\n--- profile: {label}, {launches / n:.0f} kernel launches per {unit}")
    keys = ["self_cpu_time_total"] + (["self_cuda_time_total"] if ctx.device.type == "cuda" else [])
    for key in keys:
        print(ev.table(sort_by=key, row_limit=rows, max_name_column_width=48))


def _host_syncs(ctx, work, label: str, rows: int = 12) -> None:
    """The source lines where ``work()`` makes the host wait for the device, by count: on CUDA its sync
    debug mode; on the CPU the tensor-to-Python reads of fishertune's code (where CUDA would wait)."""
    if ctx.device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        where = Counter(f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    else:
        with ReadBacks() as reads:
            work()
        where = reads.lines
    kind = "host syncs" if ctx.device.type == "cuda" else "read-backs"
    print(f"\n--- {kind}: {label}, {sum(where.values())} in all")
    for line, n in where.most_common(rows):
        print(f"  {n:6d}  {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cdr/sport_cloth.yaml")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", action="store_true")
    ap.add_argument("--steps", type=int, default=40, help="steps timed per epoch (0: all)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="baseline and FisherTune timed alternately this many times; medians reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, metavar="K", help="profile K steps of each (0: no profile)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="list the lines where one Fisher estimate and 5 steps of each wait for the device")
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

    def epoch(seed: int):
        return itertools.islice(ctx.sampler.epoch(gen(seed)), n)

    def optimizer(tuner):
        return tuner.make_optimizer("adam", foreach=True if ctx.device.type == "cpu" else None)

    # baseline and FisherTune (default preset, tuning from the first epoch) share the model
    base_tuner = _make_tuner(ctx, 0, lambda m: None)
    base_opt = optimizer(base_tuner)
    ctx.cfg = ft_cfg
    ft_tuner = _make_tuner(ctx, 0, lambda m: None)
    ft_opt = optimizer(ft_tuner)
    _sync(ctx.device)
    t0 = time.perf_counter()
    ft_tuner.on_epoch_start(1)  # Fisher on x and x' + masks
    _sync(ctx.device)
    t_fisher = time.perf_counter() - t0
    warm = list(itertools.islice(epoch(99), 3))
    for tuner, opt in ((base_tuner, base_opt), (ft_tuner, ft_opt)):  # allocations, kernels, optimizer state
        _steps(ctx, opt, tuner, warm)
    plain_fisher = ft_tuner.fisher_fn

    def fisher_time(fn) -> float:
        """Seconds for one Fisher update with ``fn``: F(x), F(x'), DR-FIM and importance (masks kept)."""
        ft_tuner.fisher_fn = fn
        _sync(ctx.device)
        t0 = time.perf_counter()
        ft_tuner._update_fisher(1, 0)
        _sync(ctx.device)
        ft_tuner.fisher_fn = plain_fisher
        return time.perf_counter() - t0

    t_fisher_warm = median(fisher_time(plain_fisher) for _ in range(max(1, args.repeats)))
    amp_fisher = fisher_fn_for(ctx, lambda: _autocast(ctx)) if args.amp and ctx.device.type == "cuda" else None
    t_fisher_amp = median(fisher_time(amp_fisher) for _ in range(max(1, args.repeats))) if amp_fisher else None
    t_base, t_ft_steps = [], []
    for r in range(args.repeats):  # alternate, so drift of the machine hits both alike
        pair = [(t_base, base_tuner, base_opt), (t_ft_steps, ft_tuner, ft_opt)]
        for out, tuner, opt in (pair if r % 2 == 0 else pair[::-1]):
            out.append(_steps(ctx, opt, tuner, epoch(1 + r)) * scale)
    t_base_m, t_ft_m = median(t_base), median(t_ft_steps)
    cached = list(epoch(1000))
    t_noload = _steps(ctx, base_opt, base_tuner, cached) * scale
    k = min(n, 20)
    fb_b, st_b = _step_costs(ctx, base_opt, base_tuner, cached[:k])
    fb_f, st_f = _step_costs(ctx, ft_opt, ft_tuner, cached[:k])
    freq = ft_cfg.fishertune.fim_update_freq
    t_ft = t_ft_m + t_fisher_warm / freq
    ratio = ft_tuner.mask.ratio()
    ms = 1000 / k
    print(f"{base_cfg.data.task} {base_cfg.data.domains} on {ctx.device} (amp {args.amp}): {n_epoch} steps/epoch "
          f"of {base_cfg.train.batch_size} per domain, {sum(p.numel() for p in ctx.model.parameters()):,} parameters"
          + (f", timed {n} steps and scaled" if n < n_epoch else "")
          + (f", median of {args.repeats} alternating repeats" if args.repeats > 1 else ""))
    print(f"  baseline epoch                 {t_base_m:8.3f} s" + (f"  {[round(t, 3) for t in t_base]}" if args.repeats > 1 else ""))
    print(f"  baseline epoch, no data loading {t_noload:7.3f} s  (batch sampling = {t_base_m - t_noload:.3f} s)")
    print(f"  FisherTune steps (masked, {100 * ratio:.1f}% active) {t_ft_m:8.3f} s"
          + (f"  {[round(t, 3) for t in t_ft_steps]}" if args.repeats > 1 else ""))
    print(f"  Fisher estimate (x and x')     {t_fisher_warm:8.3f} s, every {freq} epochs (the first, cold: "
          f"{t_fisher:.3f} s" + (f"; under bfloat16 autocast: {t_fisher_amp:.3f} s)" if t_fisher_amp else ")"))
    print(f"  FisherTune epoch (amortised)   {t_ft:8.3f} s")
    print(f"  ratio FisherTune / baseline    {t_ft / t_base_m:8.3f}x  (target <= 1.2x)")
    print(f"  per step, synced ({k} steps): forward+backward {fb_b * ms:.2f} ms baseline / {fb_f * ms:.2f} ms "
          f"FisherTune; optimizer step {st_b * ms:.2f} ms / with masks and hooks {st_f * ms:.2f} ms")
    print(f"  validation pass (both domains)  {_validation(ctx):7.3f} s")
    if args.sync_debug:
        _host_syncs(ctx, lambda: _steps(ctx, base_opt, base_tuner, cached[:5]), "baseline, 5 steps")
        _host_syncs(ctx, lambda: _steps(ctx, ft_opt, ft_tuner, cached[:5]), "FisherTune, 5 steps")
        _host_syncs(ctx, lambda: fisher_time(plain_fisher), "one Fisher estimate (x and x')")
    if args.profile:
        k = args.profile
        _profile(ctx, lambda: _steps(ctx, base_opt, base_tuner, cached[:k]), k, f"baseline, {k} steps")
        _profile(ctx, lambda: _steps(ctx, ft_opt, ft_tuner, cached[:k]), k, f"FisherTune, {k} steps")
        _profile(ctx, lambda: _monitor(ctx), 1, "one validation pass", unit="pass")
        _profile(ctx, lambda: fisher_time(plain_fisher), 1, "one Fisher estimate (x and x')", unit="estimate")
        if amp_fisher:
            _profile(ctx, lambda: fisher_time(amp_fisher), 1, "one Fisher estimate under autocast", unit="estimate")


if __name__ == "__main__":
    main()
