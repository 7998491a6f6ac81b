"""The training loop under torch.distributed: 2 gloo processes on CPU (spawned, file:// rendezvous)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fishertune.recsys.data.types import IdMap, Split
from fishertune.recsys.models import build_model
from fishertune.recsys.train import TrainConfig, is_main_process, rank_and_world, train

N_USERS, N_ITEMS = 90, 24


def _split() -> Split:
    rng = np.random.default_rng(0)
    group = rng.integers(0, 2, N_USERS)
    x = rng.random((N_USERS, N_ITEMS)) < np.where(group[:, None] == np.arange(N_ITEMS) % 2, 0.5, 0.04)
    part = rng.choice(3, size=x.shape, p=[0.7, 0.15, 0.15])
    train_, valid, test = x & (part == 0), x & (part == 1), x & (part == 2)
    train_[:4] = False
    csr = lambda m: sp.csr_matrix(m.astype(np.float32))  # noqa: E731
    return Split(csr(train_), csr(train_), csr(valid), csr(train_ | valid), csr(test),
                 IdMap(np.arange(N_USERS)), IdMap(np.arange(N_ITEMS)))


def _evaluate(split: Split):
    def evaluate_fn(model, stage):  # every rank scores all users: the result must agree across ranks
        inp, tgt = split.stage(stage)
        users = np.flatnonzero(np.diff(tgt.indptr) > 0)
        hist = torch.from_numpy(inp[users].toarray())
        with torch.no_grad():
            s = model.score(torch.from_numpy(users), hist).masked_fill(hist > 0, -math.inf)
        hits = torch.from_numpy(tgt[users].toarray()).gather(1, s.topk(5, dim=1).indices)
        return {"hits@5": float(hits.sum(1).mean())}
    return evaluate_fn


MODEL = {"name": "multdae", "hidden_dims": [16], "latent_dim": 8, "dropout": 0.0}
CFG = dict(epochs=3, batch_size=16, lr=3e-3, monitor="hits@5", device="cpu", patience=None)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        assert rank_and_world() == (rank, world) and is_main_process() == (rank == 0)
        split = _split()
        model = build_model(MODEL, N_USERS, N_ITEMS, seed=0)
        res = train(model, split, TrainConfig(**CFG), _evaluate(split), Path(tmp) / "run", data_hash="h")
        out = {"best_valid": res.best_valid, "best_epoch": res.best_epoch,
               "train": [r["train"] for r in res.history],
               "weights": [v.flatten()[:50].tolist() for v in model.state_dict().values()]}
        (Path(tmp) / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_agree_write_once_and_match_one_process(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # same metrics, epoch, averaged loss terms and weights on both ranks
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt", "config.yaml", "curves.png",
                                                     "history.jsonl", "train.log", "train_result.json"]
    log = (run / "train.log").read_text()
    assert log.count("training multdae") == 1 and "world size 2" in log
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and ckpt["finished"]

    # every global batch splits evenly here (86 users, batches of 16 and a last of 6), the DAE has no
    # dropout, so averaging the halves' gradients is the full batch's gradient: one process agrees
    torch.set_num_threads(1)
    split = _split()
    model = build_model(MODEL, N_USERS, N_ITEMS, seed=0)
    res = train(model, split, TrainConfig(**CFG), _evaluate(split), None)
    single = [v.flatten()[:50].tolist() for v in model.state_dict().values()]
    for a, b in zip(single, r0["weights"]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(res.history, r0["train"]):
        assert a["train"]["loss"] == pytest.approx(b["loss"], rel=1e-5)
