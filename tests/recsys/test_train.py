"""The training loop: closed-form fit, epochs, early stopping, best state, checkpoints, resume, NaN."""

from __future__ import annotations

import json
import math
from typing import Literal

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fishertune.config import ConfigError, StrictModel, validate
from fishertune.recsys.checkpoint import CheckpointError
from fishertune.recsys.data.types import IdMap, Split
from fishertune.recsys.models import Recommender, build_model, register_model
from fishertune.recsys.train import (NonFiniteLossError, TrainConfig, _epoch_batches, _Rows, is_main_process,
                                     maybe_init_distributed, train)

N_USERS, N_ITEMS = 90, 24




def toy_split(seed: int = 0, empty_users: int = 4) -> Split:
    """Two user groups that like the odd / even items; 70/15/15 % of each user's items to
    train / valid target / test target; the first ``empty_users`` users have no training rows."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, N_USERS)
    pref = np.where(group[:, None] == (np.arange(N_ITEMS) % 2)[None, :], 0.5, 0.04)
    x = rng.random((N_USERS, N_ITEMS)) < pref
    part = rng.choice(3, size=x.shape, p=[0.7, 0.15, 0.15])
    train = x & (part == 0)
    train[:empty_users] = False
    valid, test = x & (part == 1), x & (part == 2)
    csr = lambda m: sp.csr_matrix(m.astype(np.float32))  # noqa: E731
    return Split(train=csr(train), valid_input=csr(train), valid_target=csr(valid),
                 test_input=csr(train | valid), test_target=csr(test),
                 user_ids=IdMap(np.arange(N_USERS)), item_ids=IdMap(np.arange(N_ITEMS)))


def make_eval(split: Split, k: int = 5):
    """A small full-ranking evaluator (recall@k, ndcg@k) for the tests."""

    def evaluate_fn(model: Recommender, stage: str) -> dict[str, float]:
        inp, tgt = split.stage(stage)
        users = np.flatnonzero(np.diff(tgt.indptr) > 0)
        hist = torch.from_numpy(inp[users].toarray())
        with torch.no_grad():
            scores = model.score(torch.from_numpy(users), hist.to(model.device())).cpu().float()
        scores = scores.masked_fill(hist > 0, -math.inf)
        target = torch.from_numpy(tgt[users].toarray())
        hits = target.gather(1, scores.topk(k, dim=1).indices)
        n_t = target.sum(1)
        disc = 1.0 / torch.log2(torch.arange(2, k + 2).float())
        idcg = torch.stack([disc[: int(min(n, k))].sum() for n in n_t])
        return {f"recall@{k}": float((hits.sum(1) / n_t.clamp(max=k)).mean()),
                f"ndcg@{k}": float(((hits * disc).sum(1) / idcg).mean()), "n_users": len(users)}

    return evaluate_fn


def vae(seed: int = 0, **kw) -> Recommender:
    cfg = {"name": "multvae", "hidden_dims": [16], "latent_dim": 8, "total_anneal_steps": 20, **kw}
    return build_model(cfg, N_USERS, N_ITEMS, seed=seed)


def cfg(**kw) -> TrainConfig:
    base = dict(epochs=4, batch_size=16, lr=3e-3, monitor="ndcg@5", device="cpu", patience=None)
    return TrainConfig(**{**base, **kw})


def _states_equal(a: Recommender, b: Recommender) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# -------------------------------------------------------------------------------------------- basics


def test_train_config_is_strict():
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        validate(TrainConfig, {"epoch": 3})
    with pytest.raises(ConfigError, match="device"):
        validate(TrainConfig, {"device": "gpu"})
    assert validate(TrainConfig, {"device": "cuda:1"}).device == "cuda:1"


def test_not_distributed_by_default(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert maybe_init_distributed() is False and is_main_process()


def test_epoch_batches_cover_every_user_once_and_split_across_ranks():
    users = np.array([3, 5, 6, 9, 10, 11, 12, 20, 21, 30, 31])
    c = cfg(batch_size=4, seed=1)
    one = _epoch_batches(users, 2, c, 0, 1)
    assert sorted(np.concatenate(one).tolist()) == users.tolist() and [len(b) for b in one] == [4, 4, 3]
    assert not np.array_equal(np.concatenate(one), np.concatenate(_epoch_batches(users, 3, c, 0, 1)))
    r0, r1 = _epoch_batches(users, 2, c, 0, 2), _epoch_batches(users, 2, c, 1, 2)
    assert len(r0) == len(r1) == 3
    for g, a, b in zip(one, r0, r1):
        assert np.array_equal(np.concatenate([a, b]), g)  # same permutation, rank r takes its slice
    c3 = cfg(batch_size=5, seed=1)
    assert all(len(b) >= 1 for b in _epoch_batches(users, 1, c3, 2, 3))


def test_rows_dense_and_sparse_paths_agree():
    split = toy_split()
    train = split.train.copy()
    train.data[:] = 4.0  # ratings are binarised
    dense, sparse = _Rows(train, torch.device("cpu"), 1024), _Rows(train, torch.device("cpu"), 0)
    assert dense.dense is not None and sparse.dense is None
    users = np.array([7, 4, 50])
    assert torch.equal(dense(users), sparse(users))
    assert torch.equal(dense(users), torch.from_numpy((split.train[users].toarray() > 0).astype(np.float32)))


# ------------------------------------------------------------------------------------- closed form


def test_closed_form_fit_evaluate_and_reload(tmp_path, monkeypatch):
    split = toy_split()
    ev = make_eval(split)
    model = build_model({"name": "ease", "lambda_": 5.0}, N_USERS, N_ITEMS)
    res = train(model, split, cfg(), ev, tmp_path / "run", data_hash="h1")
    assert res.best_epoch == 1 and res.epochs_run == 1
    assert res.best_valid == ev(model, "valid")
    pop = build_model({"name": "popularity"}, N_USERS, N_ITEMS)
    pop.fit(split.train)
    assert res.best_valid["ndcg@5"] > ev(pop, "valid")["ndcg@5"] + 0.05  # EASE learns the two groups
    for name in ("config.yaml", "checkpoint.pt", "history.jsonl", "train.log", "train_result.json"):
        assert (tmp_path / "run" / name).is_file(), name
    # a finished run is loaded, not fitted again
    monkeypatch.setattr(type(model), "fit", lambda self, t: pytest.fail("refitted"))
    again = build_model({"name": "ease", "lambda_": 5.0}, N_USERS, N_ITEMS)
    res2 = train(again, split, cfg(), ev, tmp_path / "run", data_hash="h1")
    assert res2.best_valid == res.best_valid and torch.equal(again.B, model.B)


def test_popularity_through_the_loop_without_a_run_dir():
    split = toy_split()
    res = train(build_model({"name": "popularity"}, N_USERS, N_ITEMS), split, cfg(), make_eval(split), None)
    assert 0.0 <= res.best_valid["recall@5"] <= 1.0


# --------------------------------------------------------------------------------------- iterative


def test_iterative_training_learns_and_keeps_the_best_state(tmp_path):
    split = toy_split()
    ev = make_eval(split)
    model = vae()
    before = ev(model, "valid")["ndcg@5"]
    states = {}
    res = train(model, split, cfg(epochs=6), ev, tmp_path / "run", data_hash="h",
                on_epoch_end=lambda e, rec: states.__setitem__(e, {k: v.clone() for k, v in model.state_dict().items()}))
    scores = [rec["valid"]["ndcg@5"] for rec in res.history]
    assert len(res.history) == 6 and res.epochs_run == 6 and not res.stopped_early
    assert res.best_epoch == 1 + int(np.argmax(scores))  # the first best epoch
    assert res.best_valid["ndcg@5"] == max(scores) > before
    assert all(torch.equal(v, states[res.best_epoch][k]) for k, v in model.state_dict().items())
    assert ev(model, "valid") == res.best_valid
    rec = res.history[0]
    assert set(rec["train"]) == {"loss", "neg_ll", "kl", "beta", "l2"} and rec["step"] == 6  # 86 users / 16
    assert res.history[-1]["step"] == 36 and res.history[-1]["train"]["beta"] > rec["train"]["beta"]
    lines = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["finished"] and ckpt["epoch"] == 6 and ckpt["best_epoch"] == res.best_epoch
    assert "epoch 6/6" in (tmp_path / "run" / "train.log").read_text()


def test_only_users_with_training_items_are_batched():
    seen = []

    class Spy(StrictModel):
        name: Literal["test-spy"] = "test-spy"

    @register_model("test-spy")
    class SpyModel(Recommender):
        iterative = True
        config_class = Spy

        def __init__(self, c, n_users, n_items):
            super().__init__(c, n_users, n_items)
            self.w = torch.nn.Parameter(torch.zeros(n_items))

        def training_step(self, batch, step):
            seen.append(batch.clone())
            return {"loss": -(torch.log_softmax(self.w, 0) * batch).sum(1).mean()}

        def score(self, users, history):
            return self.w.expand(history.shape[0], -1)

    split = toy_split(empty_users=4)
    res = train(build_model({"name": "test-spy"}, N_USERS, N_ITEMS), split, cfg(epochs=2), make_eval(split), None)
    rows = torch.cat(seen)
    n_users = int((np.diff(split.train.indptr) > 0).sum())
    assert rows.shape[0] == 2 * n_users and bool((rows.sum(1) > 0).all())
    assert set(res.history[0]["train"]) == {"loss"}


def test_early_stopping_restores_the_best_epoch(tmp_path):
    split = toy_split()
    values = iter([0.5, 0.6, 0.55, 0.58, 0.59, 0.9])
    states = {}
    model = vae()
    res = train(model, split, cfg(epochs=6, patience=3), lambda m, s: {"ndcg@5": next(values)},
                tmp_path / "run", on_epoch_end=lambda e, r: states.__setitem__(e, {k: v.clone() for k, v in model.state_dict().items()}))
    assert res.stopped_early and res.epochs_run == 5 and res.best_epoch == 2
    assert res.best_valid == {"ndcg@5": 0.6}
    assert all(torch.equal(v, states[2][k]) for k, v in model.state_dict().items())
    assert "early stop" in (tmp_path / "run" / "train.log").read_text()


def test_missing_monitor_metric_is_a_clear_error():
    split = toy_split()
    with pytest.raises(ConfigError, match="train.monitor 'ndcg@100'.*recall@5"):
        train(vae(), split, cfg(monitor="ndcg@100"), make_eval(split), None)


def test_without_evaluation_the_last_epoch_is_kept():
    split = toy_split()
    res = train(vae(), split, cfg(epochs=2), None, None)
    assert res.best_epoch == 2 and res.best_valid == {} and len(res.history) == 2


# ------------------------------------------------------------------------------------------ resume


class Interrupt(Exception):
    pass


def _interrupt_after(k: int):
    def hook(epoch, record):
        if epoch == k:
            raise Interrupt(f"stopped after epoch {k}")
    return hook


@pytest.mark.parametrize("checkpoint_every,stop_after", [(1, 2), (2, 3)])
def test_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, checkpoint_every, stop_after):
    split = toy_split()
    ev = make_eval(split)
    c = cfg(epochs=5, checkpoint_every=checkpoint_every)
    ref_model = vae()
    ref = train(ref_model, split, c, ev, tmp_path / "ref", data_hash="h")

    model = vae()
    with pytest.raises(Interrupt):
        train(model, split, c, ev, tmp_path / "cut", data_hash="h", on_epoch_end=_interrupt_after(stop_after))
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert saved["epoch"] == (stop_after // checkpoint_every) * checkpoint_every and not saved["finished"]

    resumed_model = vae(seed=99)  # different initial weights: everything comes from the checkpoint
    torch.manual_seed(12345)  # and a different global RNG state
    res = train(resumed_model, split, c, ev, tmp_path / "cut", data_hash="h")
    assert res.resumed_from == saved["epoch"]
    assert res.best_epoch == ref.best_epoch and res.best_valid == ref.best_valid
    assert [r["train"] for r in res.history] == [r["train"] for r in ref.history]
    assert [r["valid"] for r in res.history] == [r["valid"] for r in ref.history]
    assert _states_equal(resumed_model, ref_model)
    assert "resumed from" in (tmp_path / "cut" / "train.log").read_text()


def test_resume_refuses_a_checkpoint_of_other_data(tmp_path):
    split = toy_split()
    with pytest.raises(Interrupt):
        train(vae(), split, cfg(epochs=3), make_eval(split), tmp_path, data_hash="aaaa1111",
              on_epoch_end=_interrupt_after(1))
    with pytest.raises(CheckpointError, match="aaaa1111.*bbbb2222"):
        train(vae(), split, cfg(epochs=3), make_eval(split), tmp_path, data_hash="bbbb2222")


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    split = toy_split()
    train(build_model({"name": "ease", "lambda_": 5.0}, N_USERS, N_ITEMS), split, cfg(), None, tmp_path,
          data_hash="h")
    with pytest.raises(CheckpointError, match="'ease' model, this run trains 'multvae'"):
        train(vae(), split, cfg(), None, tmp_path, data_hash="h")


def test_a_finished_run_is_returned_without_training(tmp_path):
    split = toy_split()
    ev = make_eval(split)
    first = vae()
    res = train(first, split, cfg(epochs=3), ev, tmp_path, data_hash="h")
    second = vae(seed=5)
    res2 = train(second, split, cfg(epochs=3), ev, tmp_path, data_hash="h",
                 on_epoch_end=lambda e, r: pytest.fail("trained again"))
    assert res2.best_valid == res.best_valid and res2.history == res.history and _states_equal(first, second)


# ------------------------------------------------------------------------------------ NaN / inf loss


class _NanCfg(StrictModel):
    name: Literal["test-nan-at"] = "test-nan-at"
    at_step: int = 7


@register_model("test-nan-at")
class _NanAt(Recommender):
    """A linear model whose loss turns NaN at a given step."""

    iterative = True
    config_class = _NanCfg

    def __init__(self, c, n_users, n_items):
        super().__init__(c, n_users, n_items)
        self.w = torch.nn.Parameter(torch.zeros(n_items))

    def training_step(self, batch, step):
        loss = -(torch.log_softmax(self.w, 0) * batch).sum(1).mean()
        return {"loss": loss * math.nan if step >= self.cfg.at_step else loss}

    def score(self, users, history):
        return self.w.expand(history.shape[0], -1)


def test_non_finite_loss_stops_keeps_the_last_good_checkpoint_and_says_why(tmp_path):
    split = toy_split()
    model = build_model({"name": "test-nan-at", "at_step": 14}, N_USERS, N_ITEMS)  # 6 steps per epoch
    with pytest.raises(NonFiniteLossError, match=r"epoch 3, step 14.*train.lr=0.003"):
        train(model, split, cfg(epochs=5), make_eval(split), tmp_path, data_hash="h")
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and not ckpt["finished"]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert "non-finite" in (tmp_path / "train.log").read_text()
    with pytest.raises(NonFiniteLossError, match="no checkpoint had been written"):
        train(build_model({"name": "test-nan-at", "at_step": 0}, N_USERS, N_ITEMS), split, cfg(), None, None)
