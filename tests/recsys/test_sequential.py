"""Sequential recommenders: sequences from splits, SASRec's causal mask, BERT4Rec's cloze masking,
training through run_experiment, save / load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fishertune.recsys.data.splits import leave_one_out
from fishertune.recsys.data.types import IdMap, Interactions
from fishertune.recsys.experiment import (
    ExperimentConfig,
    evaluate_model,
    run_experiment,
)
from fishertune.recsys.models import build_model
from fishertune.recsys.sequences import (
    attach_sequences,
    compact_by_history,
    filter_sequences,
    ordered_sequences,
    pad_last,
    split_sequences,
)


def cyclic_interactions(n_users: int = 60, n_items: int = 20, length: int = 12, seed: int = 0) -> Interactions:
    """Each user walks items start, start+1, ... (mod n_items): the next item is fully predictable.
    Rows are shuffled so that only the timestamps give the order."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n_items, n_users)
    users = np.repeat(np.arange(n_users), length)
    pos = np.tile(np.arange(length), n_users)
    items = (starts[users] + pos) % n_items
    perm = rng.permutation(len(users))
    return Interactions(users[perm], items[perm], IdMap(np.arange(n_users)), IdMap(np.arange(n_items)),
                        timestamps=(pos[perm] * 10).astype(np.int64), name="cyclic")


def seq_split(**kw):
    inter = cyclic_interactions(**kw)
    return attach_sequences(leave_one_out(inter), inter), inter


# ------------------------------------------------------------------------------------------ sequences


def test_ordered_sequences_follow_timestamps() -> None:
    inter = Interactions(np.array([1, 0, 1, 0, 1]), np.array([5, 2, 3, 4, 0]), IdMap(np.arange(2)),
                         IdMap(np.arange(6)), timestamps=np.array([30, 2, 10, 1, 20]))
    indptr, items = ordered_sequences(inter)
    assert indptr.tolist() == [0, 2, 5]
    assert items.tolist() == [4, 2, 3, 0, 5]


def test_leave_one_out_sequence_format() -> None:
    split, _ = seq_split(n_users=5, n_items=20, length=6)
    indptr, items = split_sequences(split)
    for u in range(5):
        seq = items[indptr[u]:indptr[u + 1]]
        assert split.test_target[u].indices.tolist() == [seq[-1]]
        assert split.valid_target[u].indices.tolist() == [seq[-2]]
        assert sorted(split.train[u].indices.tolist()) == sorted(seq[:-2].tolist())
    t_ptr, t_items = filter_sequences(indptr, items, split.train)
    assert np.array_equal(np.diff(t_ptr), np.diff(indptr) - 2)
    # the padded training sequence: left-padded, +1 shifted, last max_len items in time order
    padded = pad_last(t_ptr, t_items, 6)
    for u in range(5):
        seq = items[indptr[u]:indptr[u + 1]][:-2]
        assert padded[u].tolist() == [0, 0] + (seq + 1).tolist()
    assert pad_last(t_ptr, t_items, 2)[0].tolist() == (items[indptr[0]:indptr[1]][2:4] + 1).tolist()


def test_attach_rejects_mismatched_interactions() -> None:
    split, _ = seq_split(n_users=5)
    other = cyclic_interactions(n_users=5, seed=1)
    with pytest.raises(ValueError, match="do not match the split"):
        attach_sequences(split, other)


def test_split_without_order_is_refused() -> None:
    split = leave_one_out(cyclic_interactions(n_users=4))
    with pytest.raises(ValueError, match="no item order"):
        split_sequences(split)


def test_compact_by_history_matches_loop() -> None:
    rng = np.random.default_rng(0)
    n_items, B, H, L = 9, 40, 7, 4
    seqs = np.zeros((B, H), np.int64)
    for b in range(B):
        n = rng.integers(0, H + 1)
        seqs[b, H - n:] = rng.permutation(n_items)[:n] + 1
    history = (rng.random((B, n_items)) < 0.6).astype(np.float32)
    got = compact_by_history(torch.from_numpy(seqs), torch.from_numpy(history), L).numpy()
    for b in range(B):
        kept = [s for s in seqs[b] if s > 0 and history[b, s - 1] > 0][-L:]
        assert got[b].tolist() == [0] * (L - len(kept)) + kept


# ------------------------------------------------------------------------------------------- models


def tiny(name: str, n_users: int = 60, n_items: int = 20, **kw):
    cfg = {"name": name, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "max_len": 8, "dropout": 0.0, **kw}
    return build_model(cfg, n_users, n_items, seed=0)


@pytest.mark.parametrize("n_heads", [1, 2])
def test_sasrec_causal_mask(n_heads: int) -> None:
    model = tiny("sasrec", num_heads=n_heads).eval()
    torch.manual_seed(0)
    seqs = torch.randint(1, 21, (6, 8))
    seqs[:, :2] = 0  # left padding
    base = model.encode(seqs)
    for t in range(2, 8):
        changed = seqs.clone()
        changed[:, t] = (changed[:, t] % 20) + 1
        out = model.encode(changed)
        assert torch.allclose(out[:, :t], base[:, :t], atol=1e-6), f"position < {t} saw position {t}"
        assert not torch.allclose(out[:, t], base[:, t], atol=1e-4)  # the changed position itself moves


def test_bert4rec_is_bidirectional() -> None:
    model = tiny("bert4rec").eval()
    seqs = torch.randint(1, 21, (4, 8))
    changed = seqs.clone()
    changed[:, -1] = (changed[:, -1] % 20) + 1
    assert not torch.allclose(model.encode(seqs)[:, 0], model.encode(changed)[:, 0], atol=1e-4)


@pytest.mark.parametrize("p", [0.15, 0.5])
def test_cloze_masking_rate(p: float) -> None:
    model = tiny("bert4rec", mask_prob=p)
    torch.manual_seed(0)
    seqs = torch.randint(1, 21, (2000, 8))
    seqs[:1000, :3] = 0
    inputs, labels = model.cloze(seqs)
    masked = inputs == model.mask_token
    real = seqs > 0
    rate = masked[real].float().mean().item()
    n = int(real.sum())
    assert abs(rate - p) < 4 * (p * (1 - p) / n) ** 0.5
    assert not masked[~real].any()  # padding is never masked
    assert torch.equal(labels[masked], seqs[masked] - 1) and (labels[~masked] == -100).all()
    assert torch.equal(inputs[~masked], seqs[~masked])


def test_score_uses_the_stage_sequence() -> None:
    """Validation scores come from the training sequence, test scores from it plus the valid item."""
    split, _ = seq_split()
    model = tiny("sasrec").eval()
    model.prepare(split)
    users = torch.arange(split.n_users)
    valid_in = torch.from_numpy(split.valid_input.toarray())
    test_in = torch.from_numpy(split.test_input.toarray())
    vs = model.history_sequences(users, valid_in, 8)
    ts = model.history_sequences(users, test_in, 8)
    assert torch.equal(ts[:, :-1], vs[:, 1:])
    assert torch.equal(ts[:, -1] - 1, torch.from_numpy(split.valid_target.indices))
    assert torch.equal(vs, model.train_seqs[:, 1:])


def _exp(name: str, tmp_path, epochs: int, **model_kw) -> ExperimentConfig:
    return ExperimentConfig.model_validate({
        "name": name, "data": {"name": "cyclic"},
        "model": {"name": name, "hidden_size": 32, "num_layers": 1, "num_heads": 1, "max_len": 10,
                  "dropout": 0.1, **model_kw},
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "device": "cpu", "monitor": "ndcg@10",
                  "patience": None},
        "eval": {"ks": [10], "metrics": ["hr", "ndcg"]}, "output_dir": str(tmp_path)})


@pytest.mark.parametrize("name,kw", [("sasrec", {"loss": "bce"}), ("sasrec", {"loss": "ce"}),
                                     ("bert4rec", {"mask_prob": 0.3})])
def test_train_through_run_experiment(tmp_path, name: str, kw: dict) -> None:
    split, _ = seq_split(n_items=40)
    cfg = _exp(name, tmp_path, epochs=15, **kw)
    metrics = run_experiment(cfg, tmp_path / "run", split=split, data_hash="cyclic")
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 15
    assert history[-1]["train"]["loss"] < 0.9 * history[0]["train"]["loss"]
    # 40 items, 11 of them masked as history: a random order of the 29 others gives ndcg@10 ~ 0.16 and
    # hr@10 ~ 0.34; the cycle is learnable, so a trained model is near 1
    assert metrics["test"]["ndcg@10"] > 0.6 and metrics["test"]["hr@10"] > 0.8, metrics


def test_resume_matches_uninterrupted_run(tmp_path) -> None:
    from fishertune.recsys.train import TrainConfig, train

    split, _ = seq_split()
    tcfg = {"batch_size": 16, "lr": 0.01, "device": "cpu", "patience": None, "monitor": "ndcg@10"}
    ecfg = _exp("sasrec", tmp_path, 1).eval

    def evaluate_fn(m, stage):
        return evaluate_model(m, split, stage, ecfg)

    full = build_model(_exp("sasrec", tmp_path, 1).model, split.n_users, split.n_items, seed=0)
    train(full, split, TrainConfig(epochs=4, **tcfg), evaluate_fn, tmp_path / "full")
    part = build_model(_exp("sasrec", tmp_path, 1).model, split.n_users, split.n_items, seed=0)
    resumed = build_model(_exp("sasrec", tmp_path, 1).model, split.n_users, split.n_items, seed=0)
    ckpt = tmp_path / "part"

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(part, split, TrainConfig(epochs=4, **tcfg), evaluate_fn, ckpt, on_epoch_end=stop_after_two)
    train(resumed, split, TrainConfig(epochs=4, **tcfg), evaluate_fn, ckpt)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    losses = [[json.loads(line)["train"]["loss"] for line in (tmp_path / d / "history.jsonl").open()]
              for d in ("full", "part")]
    assert len(losses[0]) == 4 and losses[0] == losses[1]


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_save_load_identical_scores(tmp_path, name: str) -> None:
    split, _ = seq_split()
    model = tiny(name, dropout=0.1)
    model.prepare(split)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    users = torch.arange(split.n_users)
    for step in range(3):
        loss = model.training_step(users, step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path = tmp_path / "m.pt"
    torch.save(model.state_dict(), path)
    other = tiny(name)
    other.prepare(split)
    other.load_state_dict(torch.load(path))
    other.eval()
    hist = torch.from_numpy(split.test_input.toarray())
    with torch.no_grad():
        assert torch.equal(model.score(users, hist), other.score(users, hist))
    a = evaluate_model(model, split, "test", _exp(name, tmp_path, 1).eval)
    b = evaluate_model(other, split, "test", _exp(name, tmp_path, 1).eval)
    assert a == b


def test_score_before_prepare_is_an_error() -> None:
    model = tiny("sasrec").eval()
    with pytest.raises(RuntimeError, match="prepare"):
        model.score(torch.arange(2), torch.zeros(2, 20))


# ------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("name", ["beauty-sasrec", "beauty-bert4rec"])
def test_beauty_configs_validate(name: str) -> None:
    from pathlib import Path

    from fishertune.config import load_config

    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.yaml"
    cfg = load_config(ExperimentConfig, path)
    assert cfg.data.name == "beauty" and cfg.data.split.protocol == "leave_one_out"
    assert cfg.train.monitor == "ndcg@10" and cfg.eval.ks == [10, 20]
    assert cfg.model.name == name.split("-")[1]


@pytest.mark.slow
def test_beauty_sequences_from_cached_split(data_root, tmp_path, monkeypatch) -> None:
    """A split from load_split carries no order; prepare re-reads it from the recorded data config."""
    data_root("seq/Beauty.txt")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    from fishertune.recsys.data import DataConfig, load_split

    split, _ = load_split(DataConfig(name="beauty", split={"protocol": "leave_one_out"}))
    split, _ = load_split(DataConfig(name="beauty", split={"protocol": "leave_one_out"}))  # from the cache
    indptr, items = split_sequences(split)
    # brute force on the first users: the file's own order, last = test, second to last = valid
    lines = (data_root("seq/Beauty.txt")).read_text().splitlines()[:50]
    for line in lines:
        user, *seq = line.split()
        u = int(split.user_ids.to_index([int(user)])[0])
        got = split.item_ids.to_original(items[indptr[u]:indptr[u + 1]]).tolist()
        dedup = list(dict.fromkeys(reversed([int(x) for x in seq])))[::-1]  # keep_last duplicates policy
        assert got == dedup
        assert split.item_ids.to_original(split.test_target[u].indices).tolist() == [dedup[-1]]
        assert split.item_ids.to_original(split.valid_target[u].indices).tolist() == [dedup[-2]]
