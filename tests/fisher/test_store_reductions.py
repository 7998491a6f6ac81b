"""Reductions (hand-computed) and FisherStore (EMA bias correction, fp16 error bound, files, errors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fishertune.fisher.reductions import per_channel, per_group, per_head, per_layer, per_parameter, ranked, reduce
from fishertune.fisher.store import FisherSignatureError, FisherStore


def close(a, b, **kw):
    torch.testing.assert_close(a.double(), b.double(), **kw)


def small():
    return {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.tensor([1.0, 2.0]),
            "b.c.weight": torch.ones(2, 2, 2), "scale": torch.tensor(5.0)}


def test_per_parameter_channel_layer_group():
    f = small()
    assert per_parameter(f)["a.weight"] == 15
    assert per_parameter(f, "max")["a.weight"] == 5
    close(per_channel(f)["a.weight"], torch.tensor([3.0, 12.0]).double())
    close(per_channel(f, "mean")["b.c.weight"], torch.tensor([1.0, 1.0]).double())
    layers = per_layer(f)
    assert layers == {"a": 18, "b.c": 8, "<root>": 5}
    assert per_layer(f, depth=1)["b"] == 8
    groups = per_group(f, {"weights": [r".*weight"], "rest": ".*"})
    assert groups == {"weights": 23, "rest": 8}
    assert per_group(f, lambda n: n.split(".")[0])["b"] == 8
    with pytest.raises(ValueError, match="matches no group"):
        per_group(f, {"w": ".*weight"}, strict=True)
    assert ranked(layers)[0] == ("a", 18.0)
    assert reduce(f, "parameter")["scale"] == 5
    with pytest.raises(ValueError, match="by must be"):
        reduce(f, "bogus")


def test_per_head_multihead_attention_layout():
    m = nn.MultiheadAttention(6, 3)
    f = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    f["in_proj_weight"][6 + 2:6 + 4] = 1.0  # k projection rows of head 1 (head_dim 2)
    f["out_proj.weight"][:, 4:6] = 2.0  # input columns of head 2
    heads = per_head(f, m)
    want = torch.zeros(3, 3).double()
    want[1, 1] = 12.0
    close(heads["in_proj_weight"], want)
    close(heads["out_proj.weight"], torch.tensor([0.0, 0.0, 24.0]).double())
    with pytest.raises(ValueError, match="divisible"):
        per_head({"x": torch.ones(5, 2)}, {"x": (2, 0, 1)})


def test_ema_bias_correction():
    store = FisherStore()
    a, b = {"w": torch.full((3,), 2.0)}, {"w": torch.full((3,), 4.0)}
    store.update("t", a, decay=0.9)
    close(store.get("t")["w"], a["w"])  # one step: exactly the estimate
    store.update("t", b, decay=0.9)
    want = (0.9 * 0.1 * 2 + 0.1 * 4) / (1 - 0.81)
    close(store.get("t")["w"], torch.full((3,), want))
    for _ in range(200):
        store.update("t", b, decay=0.9)
    close(store.get("t")["w"], b["w"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decay"):
        store.update("t", b, decay=0.5)
    store.put("once", a)
    with pytest.raises(ValueError, match="one-shot"):
        store.update("once", a)


def test_fp16_storage_error_bound():
    torch.manual_seed(0)
    x = torch.exp(torch.randn(10000) * 6)  # values spanning ~50 orders of magnitude
    store = FisherStore("cpu-fp16")
    store.put("t", {"w": x})
    got = store.get("t")["w"]
    m = float(x.max())
    scale = 2.0 ** (math.ceil(math.log2(m)) - 15)
    big = x >= m * 2.0 ** -28
    rel = ((got - x).abs() / x)[big]
    assert rel.max() <= 2.0 ** -11 * (1 + 1e-6)
    assert ((got - x).abs()[~big]).max() <= scale * 2.0 ** -25 + 1e-30
    assert store.memory_report()["stored_bytes"] == 2 * 10000


def test_lazy_transfer_cache_and_memory_report():
    store = FisherStore("cpu")
    store.put("t", {"w": torch.ones(4)})
    first = store.get("t", "cpu")
    assert store.get("t", "cpu") is first  # cached
    assert store.memory_report()["cache_bytes"] == {"cpu": 16}
    store.put("t", {"w": torch.zeros(4)})
    assert store.get("t", "cpu")["w"].sum() == 0  # cache invalidated
    with pytest.raises(KeyError, match="no Fisher task"):
        store.get("missing")
    with pytest.raises(ValueError, match="non-finite"):
        store.put("bad", {"w": torch.tensor([float("nan")])})


def test_save_load_roundtrip_and_signature(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    for storage in ("cpu", "cpu-fp16"):
        store = FisherStore(storage)
        store.put("task a", fisher, meta={"note": "x"})
        store.update("ema", fisher, decay=0.5)
        path = store.save(tmp_path / f"f-{storage}.safetensors", model)
        back = FisherStore.load(path, model)
        assert back.tasks == ["task a", "ema"]
        assert back.meta("task a")["note"] == "x" and back.meta("ema")["ema_steps"] == 1
        tol = 1e-3 if storage == "cpu-fp16" else 1e-6
        for task in back.tasks:
            for n in fisher:
                close(back.get(task)[n], fisher[n], rtol=tol, atol=tol)
    other = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(FisherSignatureError, match="stored shape"):
        FisherStore.load(path, other)
    renamed = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(FisherSignatureError, match="not in the model"):
        FisherStore.load(path, renamed)
    (tmp_path / "junk.safetensors").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="not a readable"):
        FisherStore.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        FisherStore.load(tmp_path / "absent.safetensors")


def test_store_accepts_fisher_result():
    from fishertune.fisher import diagonal_fisher

    m = nn.Linear(3, 2)
    res = diagonal_fisher(m, [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))], progress=False)
    store = FisherStore()
    store.put("r", res)
    assert store.meta("r")["n_samples"] == 4 and store.meta("r")["paths"] == {"linear": ["<root>"]}
