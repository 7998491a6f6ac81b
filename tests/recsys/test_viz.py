"""fishertune.recsys.viz: attention maps (rows sum to 1, causal / padding structure, brute-force
summaries), the Mult-VAE views, item similarity, and the ``fishertune viz`` commands on tiny runs
trained here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fishertune.cli import main
from fishertune.recsys.models import build_model
from fishertune.recsys.viz import (attention_summary, attention_weights, item_vectors, project_2d,
                                   similar_items)

PNG = b"\x89PNG\r\n\x1a\n"


def tiny(name: str, n_users: int = 30, n_items: int = 20, **kw):
    cfg = {"name": name, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "max_len": 8, "dropout": 0.1, **kw}
    return build_model(cfg, n_users, n_items, seed=0).eval()


def padded_seqs(n: int = 6, L: int = 8, n_items: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, n_items + 1, (n, L), generator=g)
    for b in range(n):
        seqs[b, :b] = 0  # row b has b padded positions on the left
    return seqs


# ------------------------------------------------------------------------------------ attention maps


def test_sasrec_attention_rows_sum_to_one_and_are_causal() -> None:
    model = tiny("sasrec")
    seqs = padded_seqs()
    w = attention_weights(model, seqs)
    assert w.shape == (6, 2, 2, 8, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(6, 2, 2, 8))
    assert (torch.triu(w, diagonal=1) == 0).all()  # no position attends to a later one
    assert (w.diagonal(dim1=-2, dim2=-1) > 0).all()
    # asking for the weights does not change the model's output
    with torch.no_grad():
        torch.testing.assert_close(model.encode(seqs, attention=[]), model.encode(seqs), atol=1e-5, rtol=1e-5)


def test_bert4rec_attention_ignores_padding_and_matches_encoder() -> None:
    model = tiny("bert4rec")
    seqs = padded_seqs()
    seqs[:, -1] = model.mask_token
    w = attention_weights(model, seqs)
    torch.testing.assert_close(w.sum(-1), torch.ones(6, 2, 2, 8))
    pad = (seqs == 0)[:, None, None, None, :].expand_as(w)
    assert (w[pad] == 0).all()  # padded keys get no weight
    real = seqs > 0
    assert (w[..., -1, :][real[:, None, None, :].expand(-1, 2, 2, -1)] > 0).all()  # the [MASK] sees all items
    with torch.no_grad():
        a, b = model.encode(seqs, attention=[]), model.encode(seqs)
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


def test_attention_summary_matches_a_loop() -> None:
    from fishertune.recsys.data.splits import leave_one_out
    from fishertune.recsys.data.types import IdMap, Interactions
    from fishertune.recsys.sequences import attach_sequences

    rng = np.random.default_rng(1)
    users, items, ts = [], [], []
    for u in range(12):
        seq = rng.permutation(20)[:rng.integers(3, 12)]
        users += [u] * len(seq)
        items += seq.tolist()
        ts += list(range(len(seq)))
    inter = Interactions(np.array(users), np.array(items), IdMap(np.arange(12)), IdMap(np.arange(20)),
                         timestamps=np.array(ts))
    split = attach_sequences(leave_one_out(inter), inter)
    for name in ("sasrec", "bert4rec"):
        model = tiny(name, n_users=12)
        model.prepare(split)
        s = attention_summary(model, split, "test", n_users=100, batch_size=5)
        L = s["max_len"]
        hist = torch.from_numpy(split.test_input.toarray())
        seqs = model.scoring_input(torch.arange(12), hist)
        w = attention_weights(model, seqs).double().numpy()
        real = (seqs > 0).numpy()
        ent, dist, last, last_n = [], [], np.zeros((2, 2, L)), np.zeros(L)
        for b in range(12):
            for q in np.flatnonzero(real[b]):
                row = w[b, :, :, q]  # layers x heads x L
                ent.append(-(row * np.log(np.where(row > 0, row, 1))).sum(-1))
                dist.append((row * np.abs(q - np.arange(L)) * real[b]).sum(-1))
            for d in range(L):
                if real[b, L - 1 - d]:
                    last[:, :, d] += w[b, :, :, L - 1, L - 1 - d]
                    last_n[d] += 1
        np.testing.assert_allclose(s["entropy"], np.mean(ent, 0), rtol=1e-9)
        np.testing.assert_allclose(s["mean_distance"], np.mean(dist, 0), rtol=1e-9)
        np.testing.assert_allclose(s["last_by_distance"], last / np.maximum(last_n, 1), rtol=1e-9)
        lags = np.asarray(s["by_lag"])
        if name == "sasrec":
            assert np.all(lags[..., :L - 1] == 0)  # query - key < 0: the future, never attended
        else:
            assert np.all(lags[..., :L - 1] > 0)
        assert s["n_users"] == 12


# -------------------------------------------------------------------------------- vectors, projection


def test_similar_items_is_cosine_ranking_with_the_item_first() -> None:
    model = tiny("sasrec")
    vecs = item_vectors(model).numpy()
    assert vecs.shape == (20, 16) and len({tuple(r) for r in vecs.round(6)}) == 20  # unique rows
    unit = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    for item in (0, 7, 19):
        idx, sims = similar_items(model, item, k=5)
        assert idx[0] == item and sims[0] == pytest.approx(1.0, abs=1e-6)
        brute = np.argsort(-(unit @ unit[item]), kind="stable")[:5]
        assert idx.tolist() == brute.tolist()
        np.testing.assert_allclose(sims, (unit @ unit[item])[brute], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="outside"):
        similar_items(model, 20)


def test_item_vectors_refuse_models_without_them() -> None:
    with pytest.raises(ValueError, match="item similarity needs item vectors.*'ease'"):
        item_vectors(build_model({"name": "ease"}, 5, 5))


def test_pca_of_points_on_a_line() -> None:
    t = np.linspace(-1, 1, 50)
    x = np.stack([t, 2 * t, np.zeros_like(t)], 1) + 3.0
    coords, notes = project_2d(x, "pca")
    assert notes["explained"][0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(coords[:, 0]), np.abs(t) * np.sqrt(5), atol=1e-9)
    np.testing.assert_allclose(coords[:, 1], 0, atol=1e-9)
    with pytest.raises(ValueError, match="unknown projection"):
        project_2d(x, "umap")


# ---------------------------------------------------------------------------------- the viz command


@pytest.fixture
def env(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FISHERTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FISHERTUNE_DATA", str(tmp_path / "data"))
    return tmp_path


def _seq_file(path: Path, n_users: int = 30, n_items: int = 20) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, n_users + 1):
        start, length = rng.integers(1, n_items + 1), rng.integers(4, 14)
        lines.append(" ".join([str(u)] + [str((start + t) % n_items + 1) for t in range(length)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _train(env: Path, data: dict, model: dict, name: str) -> Path:
    cfg = {"name": name, "data": data, "model": model,
           "train": {"epochs": 2, "batch_size": 16, "lr": 0.01, "device": "cpu", "monitor": "ndcg@10",
                     "patience": None, "checkpoint_every": 0},
           "eval": {"ks": [10], "metrics": ["hr", "ndcg"]}, "output_dir": str(env / "runs")}
    path = env / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = env / name
    assert main(["train", str(path), "--run-dir", str(run_dir)]) == 0
    return run_dir


def _png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG, path


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_viz_commands_on_a_sequential_run(env: Path, name: str, capsys) -> None:
    seq = _seq_file(env / "seq.txt")
    run = _train(env, {"name": "tinyseq", "path": str(seq), "format": "sequence",
                       "split": {"protocol": "leave_one_out"}},
                 {"name": name, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "max_len": 8, "dropout": 0.1},
                 name)
    assert main(["viz", str(run), "attention", "--user", "2", "--stage", "valid", "--out", str(env / "o")]) == 0
    _png(env / "o" / "attention_user2_valid.png")
    if name == "bert4rec":  # the rest is the same code for both models
        return
    assert main(["viz", str(run), "attention-summary", "--n-users", "20"]) == 0
    _png(run / "viz" / "attention_summary_test.png")
    summary = json.loads((run / "viz" / "attention_summary_test.json").read_text())
    assert summary["n_users"] == 20 and np.asarray(summary["last_by_distance"]).shape == (2, 2, 8)
    assert main(["viz", str(run), "similar", "--item", "5", "--top-k", "3"]) == 0
    _png(run / "viz" / "similar_item5.png")
    table = (run / "viz" / "similar_item5.csv").read_text().splitlines()
    assert len(table) == 4 and table[0] == "rank,item,title,cosine"
    assert all(line.split(",")[1] != "5" for line in table[1:])  # the query itself is not its own neighbour
    assert main(["viz", str(run), "curves"]) == 0
    _png(run / "viz" / "curves.png")
    capsys.readouterr()
    # clear errors: an unknown user, a view of another model kind
    assert main(["viz", str(run), "attention", "--user", "999"]) == 2
    assert "unknown user id '999'" in capsys.readouterr().out
    assert main(["viz", str(run), "latent"]) == 2
    assert "needs a multvae run" in capsys.readouterr().out


def test_viz_commands_on_a_multvae_run(env: Path, capsys) -> None:
    # MovieLens-100k-shaped: the data name finds u.item titles under FISHERTUNE_DATA
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 30
    rows = [(u, i) for u in range(1, n_users + 1)
            for i in rng.choice(np.arange(1, n_items + 1), rng.integers(4, 12), replace=False)]
    csv = env / "ratings.csv"
    csv.write_text("user,item\n" + "\n".join(f"{u},{i}" for u, i in rows) + "\n")
    (env / "data" / "ml-100k").mkdir(parents=True)
    (env / "data" / "ml-100k" / "u.item").write_text(
        "".join(f"{i}|Movie number {i} (1995)|01-Jan-1995||http://x|0|1\n" for i in range(1, n_items + 1)))
    run = _train(env, {"name": "ml-100k", "path": str(csv), "columns": {"rating": None, "timestamp": None},
                       "split": {"protocol": "held_out_users", "n_valid_users": 8, "n_test_users": 8}},
                 {"name": "multvae", "hidden_dims": [16], "latent_dim": 4, "total_anneal_steps": 5}, "vae")
    for method in ("pca", "tsne"):
        assert main(["viz", str(run), "latent", "--method", method]) == 0
        _png(run / "viz" / f"latent_{method}_train.png")
    capsys.readouterr()
    from fishertune.recsys.runs import load_run

    split = load_run(run).split
    test_user = str(split.user_ids.to_original(split.eval_users("test"))[0])
    assert main(["viz", str(run), "reconstruction", "--user", test_user, "--top", "5"]) == 0
    out = capsys.readouterr().out
    assert "Movie number" in out and "(test input)" in out
    _png(run / "viz" / f"reconstruction_user{test_user}.png")
    assert main(["viz", str(run), "similar", "--item", "3", "--top-k", "4"]) == 0
    assert "Movie number 3 (1995)" in capsys.readouterr().out  # the query item, by its title
    lines = (run / "viz" / "similar_item3.csv").read_text().splitlines()
    assert len(lines) == 5 and all("Movie number" in line for line in lines[1:])
    assert main(["viz", str(run), "curves"]) == 0
    _png(run / "viz" / "curves.png")
    capsys.readouterr()
    assert main(["viz", str(run), "attention", "--user", test_user]) == 2
    assert "needs a sasrec / bert4rec run" in capsys.readouterr().out
    assert main(["viz", str(run), "similar", "--item", "999"]) == 2
    assert "unknown item id '999'" in capsys.readouterr().out


def test_viz_refuses_a_folder_that_is_not_a_run(tmp_path, capsys) -> None:
    assert main(["viz", str(tmp_path), "curves"]) == 2
    assert "no history.jsonl" in capsys.readouterr().out
