"""LastFM under the sampled protocol: the S3-Rec files (``LastFM.txt`` sequences and
``LastFM_sample.txt``, one line ``user neg1 ... negN`` per user) read through the data layer and
scored by a sequential model must give the ranks a brute-force count straight from the files gives;
seeded negatives (every other dataset) through the experiment's evaluator; the LastFM presets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fishertune.recsys.data import negatives_matrix, read_negatives, read_sequences
from fishertune.recsys.data.splits import leave_one_out
from fishertune.recsys.evaluate import evaluate_sampled, sample_negatives
from fishertune.recsys.experiment import EvalConfig, evaluate_model
from fishertune.recsys.models import build_model
from fishertune.recsys.sequences import attach_sequences

REPO = Path(__file__).resolve().parents[2]


def write_files(tmp_path: Path, n_users: int = 25, n_items: int = 40, n_neg: int = 9,
                seed: int = 0) -> tuple[Path, Path]:
    """A sequence file and a negatives file in the S3-Rec formats, with non-contiguous original IDs
    (item ``i`` is written as ``3 * i + 7``, users start at 101) so that ID mapping errors show."""
    rng = np.random.default_rng(seed)
    seqs = [rng.permutation(n_items)[:rng.integers(3, 12)] for _ in range(n_users)]
    known = np.unique(np.concatenate(seqs))  # negatives are items of the data, never the user's own
    seq_lines, neg_lines = [], []
    for u, seq in enumerate(seqs):
        neg = rng.choice(np.setdiff1d(known, seq), n_neg, replace=False)
        seq_lines.append(" ".join(map(str, [101 + u, *(3 * seq + 7)])))
        neg_lines.append(" ".join(map(str, [101 + u, *(3 * neg + 7)])))
    order = rng.permutation(n_users)  # the negatives file need not follow the sequence file's order
    seq_path, neg_path = tmp_path / "LastFM.txt", tmp_path / "LastFM_sample.txt"
    seq_path.write_text("\n".join(seq_lines) + "\n")
    neg_path.write_text("\n".join(neg_lines[i] for i in order) + "\n")
    return seq_path, neg_path


def user_scorer(model, split):
    """``score_user(user_id, history_ids) -> {item_id: score}`` for :func:`brute_force`, one user at a time."""

    def score_user(user: int, history: list[int]) -> dict[int, float]:
        u = int(split.user_ids.to_index([user])[0])
        row = torch.zeros(1, split.n_items)
        row[0, split.item_ids.to_index(history)] = 1.0
        with torch.no_grad():
            s = model.score(torch.tensor([u]), row)[0].numpy()
        return dict(zip(split.item_ids.ids.tolist(), s.tolist()))
    return score_user


def brute_force(seq_path: Path, neg_path: Path, score_user, stage: str, ks=(1, 5, 10)) -> dict[str, float]:
    """Per user straight from the text files: history = all but the last (test) or last two (valid)
    items, target = the next one, rank = 1 + #negatives scoring >= the target; mean over users."""
    negs = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in neg_path.read_text().splitlines()}
    values: dict[str, list[float]] = {f"{m}@{k}": [] for m in ("hr", "ndcg") for k in ks}
    values["mrr"] = []
    for line in seq_path.read_text().splitlines():
        user, *items = line.split()
        items = [int(x) for x in items]
        history, target = (items[:-1], items[-1]) if stage == "test" else (items[:-2], items[-2])
        scores = score_user(int(user), history)  # dict original item -> score
        rank = 1 + sum(scores[n] >= scores[target] for n in negs[user])
        for k in ks:
            values[f"hr@{k}"].append(float(rank <= k))
            values[f"ndcg@{k}"].append(1.0 / np.log2(rank + 1) if rank <= k else 0.0)
        values["mrr"].append(1.0 / rank)
    return {k: float(np.mean(v)) for k, v in values.items()}


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("stage", ["valid", "test"])
def test_sampled_protocol_with_file_negatives_matches_brute_force(tmp_path: Path, name: str, stage: str) -> None:
    seq_path, neg_path = write_files(tmp_path)
    inter = read_sequences(seq_path, name="lastfm-tiny")
    split = attach_sequences(leave_one_out(inter), inter)
    neg = negatives_matrix(read_negatives(neg_path), split.user_ids, split.item_ids)
    assert neg.shape == (25, 9) and (neg >= 0).all()

    model = build_model({"name": name, "hidden_size": 16, "num_layers": 1, "num_heads": 2, "max_len": 6,
                         "dropout": 0.0}, split.n_users, split.n_items, seed=3)
    model.prepare(split)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(5):  # a few steps so that the scores are not those of a fresh model
        loss = model.training_step(torch.arange(split.n_users), step)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    def score_fn(users: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.score(users, history)

    inp, tgt = split.stage(stage)
    got = evaluate_sampled(score_fn, inp, tgt, negatives=neg, ks=(1, 5, 10))

    score_user = user_scorer(model, split)

    want = brute_force(seq_path, neg_path, score_user, stage)
    assert got["n_users"] == 25
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_negatives_for_unknown_items_are_an_error(tmp_path: Path) -> None:
    seq_path, neg_path = write_files(tmp_path)
    lines = neg_path.read_text().splitlines()
    first = lines[0].split()
    lines[0] = " ".join([first[0], "99999", *first[2:]])  # an item no sequence has
    neg_path.write_text("\n".join(lines) + "\n")
    inter = read_sequences(seq_path)
    with pytest.raises(Exception, match="99999"):
        negatives_matrix(read_negatives(neg_path), inter.user_ids, inter.item_ids)


def test_seeded_negatives_through_the_experiment_evaluator(tmp_path: Path) -> None:
    """Datasets without a negatives file: ``eval.protocol: sampled`` draws seeded negatives outside the
    user's items; the experiment's evaluator equals evaluate_sampled on those draws, run after run."""
    seq_path, _ = write_files(tmp_path, n_items=60)
    inter = read_sequences(seq_path)
    split = attach_sequences(leave_one_out(inter), inter)
    model = build_model({"name": "sasrec", "hidden_size": 8, "num_layers": 1, "num_heads": 1, "max_len": 6},
                        split.n_users, split.n_items, seed=0)
    model.prepare(split)
    cfg = EvalConfig(protocol="sampled", ks=[1, 5, 10], metrics=["hr", "ndcg", "mrr"], n_negatives=20,
                     negatives_seed=7)
    a = evaluate_model(model, split, "test", cfg)
    assert a == evaluate_model(model, split, "test", cfg)
    inp, tgt = split.stage("test")
    users = split.eval_users("test")
    neg = sample_negatives(inp, tgt, users, 20, seed=7)
    seen = (inp + tgt).toarray() > 0
    assert not seen[users[:, None], neg].any()
    full = np.full((split.n_users, 20), -1, dtype=np.int64)
    full[users] = neg

    def score_fn(u, h):
        with torch.no_grad():
            return model.score(u, h)

    b = evaluate_sampled(score_fn, inp, tgt, negatives=full, ks=(1, 5, 10))
    assert a == b
    other = evaluate_model(model, split, "test", cfg.model_copy(update={"negatives_seed": 8}))
    assert other != a  # another seed, other negatives


@pytest.mark.parametrize("name", ["lastfm-sasrec", "lastfm-bert4rec"])
def test_lastfm_presets(name: str) -> None:
    from fishertune.config import load_config
    from fishertune.recsys.experiment import ExperimentConfig

    cfg = load_config(ExperimentConfig, REPO / "configs" / f"{name}.yaml")
    assert cfg.data.name == "lastfm" and cfg.data.split.protocol == "leave_one_out"
    assert cfg.eval.protocol == "sampled" and cfg.eval.n_negatives == 99
    assert cfg.train.monitor in cfg.eval.metric_names()


def test_real_lastfm_negatives_fit_the_split(data_root, tmp_path, monkeypatch) -> None:
    """Every LastFM user has 99 negatives, none of them an item of the user (so the file serves the
    validation stage too), all of them items of the split."""
    data_root("seq/LastFM_sample.txt")
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    from fishertune.recsys.data import DataConfig, load_split
    from fishertune.recsys.data.registry import load_negatives

    split, _ = load_split(DataConfig(name="lastfm", split={"protocol": "leave_one_out"}))
    neg = negatives_matrix(load_negatives("lastfm"), split.user_ids, split.item_ids)
    assert neg.shape == (split.n_users, 99) == (1090, 99) and (neg >= 0).all()
    assert all(len(set(row)) == 99 for row in neg.tolist())
    seen = (split.test_input + split.test_target).tocsr()
    rows = np.repeat(np.arange(split.n_users), 99)
    assert np.asarray(seen[rows, neg.ravel()]).ravel().sum() == 0


def test_dataset_negatives_through_the_experiment_evaluator(tmp_path: Path, monkeypatch) -> None:
    """``eval.negatives: dataset`` (LastFM's fixed negatives in train / compare runs) against the brute
    force, on tiny files placed where the registry looks for LastFM."""
    if "negatives" not in EvalConfig.model_fields:
        pytest.skip("this version has no eval.negatives (dataset negatives in experiments)")
    from fishertune.recsys.data import DataConfig, load_split

    (tmp_path / "data" / "seq").mkdir(parents=True)
    seq_path, neg_path = write_files(tmp_path / "data" / "seq")
    monkeypatch.setenv("FISHERTUNE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    split, _ = load_split(DataConfig(name="lastfm", split={"protocol": "leave_one_out"}))
    model = build_model({"name": "sasrec", "hidden_size": 8, "num_layers": 1, "num_heads": 1, "max_len": 6},
                        split.n_users, split.n_items, seed=0)
    model.prepare(split)
    model.eval()

    score_user = user_scorer(model, split)

    for stage in ("valid", "test"):
        cfg = EvalConfig(protocol="sampled", negatives="dataset", ks=[1, 5, 10], metrics=["hr", "ndcg", "mrr"])
        got = evaluate_model(model, split, stage, cfg)
        want = brute_force(seq_path, neg_path, score_user, stage)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (stage, key)
