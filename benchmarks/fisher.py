"""Diagonal empirical Fisher, side by side: fishertune vs a naive loop, torch.func vmap, BackPACK,
nngeometry and curvlinops, on (a) an MLP, (b) a Mult-VAE, (c) a SASRec-sized transformer, (d) a CNN.

    python benchmarks/fisher.py                 # CPU, full sizes
    python benchmarks/fisher.py --quick         # fast smoke run
    python benchmarks/fisher.py --device cuda   # on the GPU

Each (model, method) row runs in a fresh subprocess so that peak memory is its own: on CPU the peak
resident set size above the level before the call (polled), on CUDA ``max_memory_allocated`` above the
allocation before the call. Columns: samples/s over all batches (median of repeats; the naive loop is
timed on the first batch), peak memory, time per sample relative to a plain forward+backward,
and the max abs difference to the naive per-sample loop on the first batch (relative to the naive
result's max in brackets).
Anchors: install with ``pip install torch==2.13.0 backpack-for-pytorch nngeometry curvlinops-for-pytorch``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

METHODS = ["plain", "naive", "fishertune", "torch.func", "backpack", "nngeometry", "curvlinops"]
MODELS = ["mlp", "vae", "sasrec", "cnn"]


class Unsupported(Exception):
    pass


# -- methods ------------------------------------------------------------------------------------------


def plain(case):
    params = [p for p in case.model.parameters()]

    def run():
        for (x, y) in case.batches:
            for p in params:
                p.grad = None
            case.nll(case.model(*x), y).sum().backward()
    return run, None


def naive(case):
    params = dict(case.model.named_parameters())

    def run():
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for (x, y) in case.batches:
            for i in range(y.shape[0]):
                loss = case.nll(case.model(*(t[i:i + 1] for t in x)), y[i:i + 1]).sum()
                for (n, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values()))):
                    acc[n] += g * g
                count += 1
        return {n: v / count for n, v in acc.items()}
    return run, lambda r: r


def fishertune(case):
    from fishertune.fisher import diagonal_fisher

    def run():
        return diagonal_fisher(case.model, case.batches, likelihood=case.likelihood, progress=False)
    return run, lambda r: r.fisher


def torch_func(case):
    from fishertune.fisher.functorch import whole_model_squares

    params = dict(case.model.named_parameters())
    per = sum(p.numel() for p in params.values())
    chunk = max(1, int(2 ** 27 // per))  # bound the dense per-sample gradients (~512 MB in fp32)

    def run():
        acc, n = None, 0
        for (x, y) in case.batches:
            with _math_sdpa(x[0].device):  # vmap has no batching rule for the fused attention kernels
                s = whole_model_squares(case.model, params, x, y, case.nll, chunk=chunk)
            acc = s if acc is None else {k: acc[k] + s[k] for k in acc}
            n += y.shape[0]
        return {k: v / n for k, v in acc.items()}
    return run, lambda r: r


def _math_sdpa(device):
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def backpack_(case):
    if not case.sequential:
        raise Unsupported("needs an nn.Sequential of supported layers (no MultiheadAttention, no custom forward)")
    try:
        from backpack import backpack, extend
        from backpack.extensions import SumGradSquared
    except ImportError as exc:
        raise Unsupported(f"not installed ({exc})") from None
    model = extend(case.model)

    def run():
        acc, n = None, 0
        for (x, y) in case.batches:
            model.zero_grad()
            loss = case.nll(model(*x), y).sum()
            with backpack(SumGradSquared()):
                loss.backward()
            s = {k: p.sum_grad_squared.detach().clone() for k, p in model.named_parameters()}
            acc = s if acc is None else {k: acc[k] + s[k] for k in acc}
            n += y.shape[0]
        return {k: v / n for k, v in acc.items()}
    return run, lambda r: r


def nngeometry_(case):
    if not case.float_input:
        raise Unsupported("no nn.Embedding / nn.MultiheadAttention layers (needs float inputs it can differentiate)")
    try:
        from nngeometry.backend import TorchHooksJacobianBackend
        from nngeometry.layercollection import LayerCollection
        from nngeometry.object import PMatDiag
    except ImportError as exc:
        raise Unsupported(f"not installed ({exc})") from None
    from torch.utils.data import DataLoader, TensorDataset

    xs = torch.cat([x[0] for x, _ in case.batches])
    ys = torch.cat([y for _, y in case.batches])
    loader = DataLoader(TensorDataset(xs, ys), batch_size=case.batches[0][1].shape[0])
    model = case.model
    try:
        lc = LayerCollection.from_model(model)
    except Exception as exc:  # noqa: BLE001
        raise Unsupported(f"LayerCollection: {exc}") from None

    def function(x, y):
        return case.nll(model(x), y).unsqueeze(1)  # per-sample log-likelihood (sign irrelevant, squared)

    # nngeometry orders parameters by its layer collection: map them back by module
    def run_mapped():
        backend = TorchHooksJacobianBackend(model, function=function, layer_collection=lc)
        diag = PMatDiag(generator=backend, examples=loader).data
        modules = dict(model.named_modules())
        out, start = {}, 0
        for lname in lc.layers:
            mod = modules[lname]
            for pname in ("weight", "bias"):
                p = getattr(mod, pname, None)
                if p is None:
                    continue
                out[f"{lname}.{pname}"] = diag[start:start + p.numel()].reshape(p.shape)
                start += p.numel()
        return out
    return run_mapped, lambda r: r


def curvlinops_(case, matvecs: int = 8):
    if case.likelihood != "categorical" or not case.float_input:
        raise Unsupported("loss must be CrossEntropy/MSE/BCE per sample (multinomial and sequence losses differ)")
    try:
        from curvlinops import EFLinearOperator, hutchinson_diag
    except ImportError as exc:
        raise Unsupported(f"not installed ({exc})") from None
    params = [p for p in case.model.parameters()]
    data = [(x[0], y) for x, y in case.batches]

    def run():
        op = EFLinearOperator(case.model, torch.nn.CrossEntropyLoss(reduction="mean"), params, data,
                              check_deterministic=False)
        d = hutchinson_diag(op, matvecs)
        out, start = {}, 0
        for n, p in case.model.named_parameters():
            out[n] = d[start:start + p.numel()].reshape(p.shape)
            start += p.numel()
        return out
    return run, lambda r: r


BUILDERS: dict[str, Callable] = {"plain": plain, "naive": naive, "fishertune": fishertune, "torch.func": torch_func,
                                 "backpack": backpack_, "nngeometry": nngeometry_, "curvlinops": curvlinops_}


# -- measurement --------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_cpu(fn):
    peak = [_rss()]
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0005)

    base = _rss()
    th = threading.Thread(target=poll, daemon=True)
    th.start()
    try:
        out = fn()
    finally:
        stop.set()
        th.join()
    peak[0] = max(peak[0], _rss())
    return out, peak[0] - base


def worker(model: str, method: str, device: str, quick: bool, repeats: int, ref_path: str | None,
           batch: int | None = None) -> dict:
    """Time ``method`` over all batches (the naive loop over the first batch only) and compare its result
    on the first batch with the naive loop's."""
    import dataclasses

    from fisher_models import build

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    case = build(model, quick, device, batch)
    first = dataclasses.replace(case, batches=case.batches[:1])
    timed = first if method == "naive" else case
    n = sum(y.shape[0] for _, y in timed.batches)
    row = {"model": case.name, "method": method, "note": case.note}
    try:
        run, extract = BUILDERS[method](timed)
        run_first, _ = BUILDERS[method](first) if timed is not first else (run, extract)
    except Unsupported as exc:
        return {**row, "unsupported": str(exc)}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            result = run()
            sync()
            peak = torch.cuda.max_memory_allocated() - base
        else:
            result, peak = _peak_cpu(run)
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - t0)
        if extract is not None and timed is not first:
            result = run_first()
    except Exception as exc:  # noqa: BLE001 - an anchor that fails on a model is a row, not a crash
        return {**row, "unsupported": f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    t = statistics.median(times)
    row.update(seconds=t, samples_per_s=n / t, peak_bytes=int(peak), n=n)
    if extract is not None:
        fisher = {k: v.detach().float().cpu() for k, v in extract(result).items()}
        if method == "naive" and ref_path:
            torch.save(fisher, ref_path)
        elif ref_path and os.path.exists(ref_path):
            ref = torch.load(ref_path)
            common = [k for k in ref if k in fisher]
            if len(common) != len(ref):
                row["note"] = (row.get("note", "") + f"; compared {len(common)}/{len(ref)} tensors").strip("; ")
            row["max_abs_diff"] = max(float((fisher[k] - ref[k]).abs().max()) for k in common)
            row["ref_max"] = max(float(ref[k].abs().max()) for k in common)
    if method == "fishertune":
        row["paths"] = {k: len(v) for k, v in result.paths.items()}
    if method == "curvlinops":
        row["note"] = "Hutchinson estimate, 8 matvecs (an exact diagonal needs one matvec per parameter)"
    if method == "naive":
        row["note"] = (row.get("note", "") + "; timed on the first batch").strip("; ")
    return row


def _fmt_bytes(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, help="samples per batch (default: per model and device)")
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print("ROW " + json.dumps(worker(*args.worker, args.device, args.quick, args.repeats, args.ref, args.batch)))
        return 0
    rows = []
    methods = args.methods.split(",")
    if "naive" in methods:  # the reference first
        methods = ["naive"] + [m for m in methods if m != "naive"]
    if "plain" in methods:
        methods = ["plain"] + [m for m in methods if m != "plain"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            ref = os.path.join(tmp, f"{model}.pt")
            for method in methods:
                cmd = [sys.executable, __file__, "--worker", model, method, "--device", args.device,
                       "--repeats", str(args.repeats), "--ref", ref] + (["--quick"] if args.quick else []) \
                    + (["--batch", str(args.batch)] if args.batch else [])
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "FISHERTUNE_PROGRESS": "0"})
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
                if not line:
                    row = {"model": model, "method": method,
                           "unsupported": f"worker crashed: {proc.stderr.strip().splitlines()[-1:] }"}
                else:
                    row = json.loads(line[-1][4:])
                rows.append(row)
                print(_line(row, rows), flush=True)
    _table(rows, args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _line(row, rows) -> str:
    if "unsupported" in row:
        return f"  {row['model']:<44} {row['method']:<11} not supported: {row['unsupported']}"
    plain_sps = next((r["samples_per_s"] for r in rows if r["model"] == row["model"] and r["method"] == "plain"
                      and "seconds" in r), None)
    ratio = f"{plain_sps / row['samples_per_s']:6.2f}x" if plain_sps else "   n/a"
    diff = (f"{row['max_abs_diff']:.2e} ({row['max_abs_diff'] / max(row['ref_max'], 1e-30):.0e})"
            if "max_abs_diff" in row else "-")
    return (f"  {row['model']:<44} {row['method']:<11} {row['samples_per_s']:>11,.1f}/s "
            f"{_fmt_bytes(row['peak_bytes']):>10} {ratio} {diff}")


def _table(rows, args) -> None:
    from rich.console import Console
    from rich.table import Table

    dev = args.device
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name()})"
    t = Table(title=f"diagonal empirical Fisher, {dev}, torch {torch.__version__}"
                    f"{' --quick' if args.quick else ''}{f', batch {args.batch}' if args.batch else ''}")
    for col in ["model", "method", "samples/s", "peak mem", "x fwd+bwd", "max |diff| to naive (rel)", "note"]:
        t.add_column(col, justify="left" if col in ("model", "method", "note") else "right")
    for r in rows:
        if "unsupported" in r:
            t.add_row(r["model"], r["method"], "-", "-", "-", "-", "not supported: " + r["unsupported"])
            continue
        plain_sps = next((x["samples_per_s"] for x in rows if x["model"] == r["model"] and x["method"] == "plain"
                          and "seconds" in x), None)
        diff = (f"{r['max_abs_diff']:.1e} ({r['max_abs_diff'] / max(r['ref_max'], 1e-30):.0e})"
                if "max_abs_diff" in r else "-")
        note = r.get("note", "")
        if "paths" in r:
            note = (note + "; paths " + ", ".join(f"{k}:{v}" for k, v in r["paths"].items())).strip("; ")
        t.add_row(r["model"], r["method"], f"{r['samples_per_s']:,.1f}", _fmt_bytes(r["peak_bytes"]),
                  f"{plain_sps / r['samples_per_s']:.2f}" if plain_sps else "-", diff, note)
    Console(width=220).print(t)


if __name__ == "__main__":
    sys.exit(main())
