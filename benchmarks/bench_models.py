"""Model speed on ML-1M: the EASE fit (vs RecBole's EASE) and one Mult-VAE epoch (vs a bare MLP).

ML-1M is read with pandas from ``$FISHERTUNE_DATA/ml-1m/ratings.dat.gz``, ratings >= 4 kept as binary
interactions, all 6,040 users x 3,706 items (the item map of every rating). Rows:

- EASE fit (lambda 500): Gram matrix and inverse, best of ``repeats``; target < 3 s on 2 CPU cores.
- RecBole's EASE (its ``__init__`` does the fit: ``np.linalg.inv`` in float32), when RecBole imports;
  with the largest difference between its ``B`` and ours.
- One Mult-VAE epoch through ``fishertune.recsys.train`` (default [n_items, 600, 200] model, batches of
  500 over every user with a training item; the second epoch's training time, so one-off start-up costs
  are out), against a plain baseline: the same number of batches of a bare ``nn.Sequential`` MLP of
  the same shape, forward + backward (+ the Adam step: a second figure).

Run: ``FISHERTUNE_DATA=... FISHERTUNE_PROGRESS=0 python benchmarks/bench_models.py [--device cuda]
[--threads N] [--synthetic]``. RecBole is used when importable (e.g. run the script with a throwaway
venv's python that has ``recbole``, scikit-learn and tensorboard and sees the project's packages through
a ``.pth`` file); otherwise its row says why it is missing.
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
import torch

from common import best_time, ml1m_binary  # noqa: E402 (benchmarks/ is on sys.path when run)
from fishertune.recsys.data.types import IdMap, Split
from fishertune.recsys.models import EASE, EASEConfig, build_model
from fishertune.recsys.models.ease import gram_matrix
from fishertune.recsys.train import TrainConfig, train




def synthetic_ml1m(seed: int = 0) -> sp.csr_matrix:
    """ML-1M-shaped random data (6,040 x 3,706, ~575k interactions, popularity-skewed)."""
    rng = np.random.default_rng(seed)
    pop = rng.zipf(1.3, 3706).astype(np.float64)
    pop /= pop.sum()
    per_user = np.clip(rng.lognormal(4.0, 1.0, 6040).astype(int), 5, 3000)
    per_user = (per_user * 575_000 / per_user.sum()).astype(int).clip(1)
    rows = np.repeat(np.arange(6040), per_user)
    cols = rng.choice(3706, size=rows.size, p=pop)
    x = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=(6040, 3706))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x




def recbole_ease(x: sp.csr_matrix, lam: float) -> tuple[Callable[[], np.ndarray], str]:
    """RecBole's EASE fit on ``x`` (its model's ``__init__``), through minimal config/dataset shims."""
    import recbole  # noqa: F401  (ImportError: reported by the caller)
    from recbole.model.general_recommender.ease import EASE as RecBoleEASE

    class Config(dict):
        device = torch.device("cpu")

    class Dataset:
        def num(self, field: str) -> int:
            return x.shape[0] if field == "user_id" else x.shape[1]

        def inter_matrix(self, form: str = "csr") -> sp.csr_matrix:
            return x.copy()

    config = Config(reg_weight=lam, USER_ID_FIELD="user_id", ITEM_ID_FIELD="item_id", NEG_PREFIX="neg_",
                    device=torch.device("cpu"))
    return (lambda: np.asarray(RecBoleEASE(config, Dataset()).item_similarity),
            f"recbole {recbole.__version__}, np.linalg.inv float32")


def _split_of(x: sp.csr_matrix) -> Split:
    empty = sp.csr_matrix(x.shape, dtype=np.float32)
    return Split(x, x, empty, x, empty, IdMap(np.arange(x.shape[0])), IdMap(np.arange(x.shape[1])))


def bare_mlp_epoch(x: sp.csr_matrix, n_batches: int, batch_size: int, device: str,
                   with_adam: bool) -> float:
    """Seconds for ``n_batches`` forward+backward passes of a plain MLP of Mult-VAE's shape."""
    n = x.shape[1]
    enc = torch.nn.Sequential(torch.nn.Linear(n, 600), torch.nn.Tanh(), torch.nn.Linear(600, 400))
    dec = torch.nn.Sequential(torch.nn.Linear(200, 600), torch.nn.Tanh(), torch.nn.Linear(600, n))
    enc.to(device), dec.to(device)
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    dense = torch.from_numpy(x.toarray()).to(device)
    rng = np.random.default_rng(0)
    batches = [torch.from_numpy(rng.choice(x.shape[0], batch_size, replace=False)).to(device)
               for _ in range(n_batches)]

    def run() -> None:
        for idx in batches:
            b = dense[idx]
            logits = dec(enc(torch.nn.functional.normalize(b))[:, :200])
            loss = -(torch.log_softmax(logits, 1) * b).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            if with_adam:
                opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    run()  # warm-up
    return best_time(run, 3)[0]


def bench_models(repeats: int = 3, device: str = "cpu", synthetic: bool = False) -> list[dict[str, Any]]:
    """Rows ``{"what", "seconds", "note"}``."""
    x = synthetic_ml1m() if synthetic else ml1m_binary()
    rows: list[dict[str, Any]] = []
    shape = f"{x.shape[0]:,} x {x.shape[1]:,}, {x.nnz:,} interactions"

    # -- EASE
    model = EASE(EASEConfig(lambda_=500.0), *x.shape).to(device)
    model.fit(x)  # warm-up
    sec, _ = best_time(lambda: model.fit(x), repeats)
    rows.append({"what": "EASE fit (fishertune)", "seconds": sec,
                 "note": f"{shape}; {device}, {'LAPACK potrf+potri' if device == 'cpu' else 'torch cholesky'} float64"})
    sec_gram, gram = best_time(lambda: gram_matrix(x), repeats)
    rows.append({"what": "  of which X^T X (scipy.sparse)", "seconds": sec_gram, "note": "dense float64 result"})
    ours = model.B.cpu().numpy()
    try:
        run, note = recbole_ease(x, 500.0)
        sec, theirs = best_time(run, repeats)
        rows.append({"what": "EASE fit (RecBole)", "seconds": sec,
                     "note": f"{note}; cpu; max |B_ours - B_recbole| = {np.abs(theirs - ours).max():.1e} "
                             f"(max |B| = {np.abs(ours).max():.2f})"})
    except ImportError as err:
        rows.append({"what": "EASE fit (RecBole)", "seconds": math.nan,
                     "note": f"not importable here ({err}); run this script with a python that has recbole"})

    # -- Mult-VAE: one epoch through the training loop, and a bare MLP baseline
    split = _split_of(x)
    vae = build_model({"name": "multvae"}, *x.shape, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=500, lr=1e-3, device=device, patience=None)
    res = train(vae, split, cfg, None, None)
    n_batches = math.ceil(int((np.diff(x.indptr) > 0).sum()) / cfg.batch_size)
    epoch2 = res.history[1]["train_seconds"]
    rows.append({"what": "Mult-VAE epoch (fishertune train)", "seconds": epoch2,
                 "note": f"{n_batches} batches of 500, [n_items, 600, 200], Adam; epoch 1 (with start-up) "
                         f"{res.history[0]['train_seconds']:.2f} s"})
    for with_adam in (False, True):
        sec = bare_mlp_epoch(x, n_batches, 500, device, with_adam)
        rows.append({"what": "bare MLP fwd+bwd" + (" + Adam" if with_adam else ""), "seconds": sec,
                     "note": f"{n_batches} batches, same shape, data dense on {device}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--synthetic", action="store_true", help="ML-1M-shaped random data instead of ML-1M")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench_models(device=args.device, synthetic=args.synthetic)
    data = "synthetic ML-1M-shaped data" if args.synthetic else "ML-1M (ratings >= 4)"
    print(f"{data}; torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (best of 3; other processes on a shared machine inflate "
          "timings)")
    print(f"{'what':<36} {'seconds':>8}  note")
    for r in rows:
        print(f"{r['what']:<36} {r['seconds']:>8.3f}  {r['note']}")


if __name__ == "__main__":
    main()
