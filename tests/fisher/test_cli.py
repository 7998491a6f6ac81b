"""`fishertune fisher compute/report` on a tiny model saved by the test (a .pt bundle and a --loader)."""

from __future__ import annotations

import argparse
import textwrap

import torch
from torch import nn

from fishertune.fisher import diagonal_fisher
from fishertune.fisher.cli import register
from fishertune.fisher.store import FisherStore


def _bundle(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(6, 4), torch.randint(0, 3, (6,))) for _ in range(2)]
    path = tmp_path / "bundle.pt"
    torch.save({"model": model, "batches": batches, "likelihood": "categorical"}, path)
    return path, model, batches


def test_compute_and_report_through_main(tmp_path):
    from fishertune.cli import main

    path, model, batches = _bundle(tmp_path)
    out = tmp_path / "F.safetensors"
    assert main(["fisher", "compute", str(path), "--out", str(out), "--reduction", "layer"]) == 0
    store = FisherStore.load(out, model)
    want = diagonal_fisher(model, batches, progress=False)
    got = store.get("fisher")
    for n in want.keys():
        torch.testing.assert_close(got[n].double(), want[n].double(), rtol=1e-6, atol=1e-9)
    assert store.meta("fisher")["n_samples"] == 12 and store.meta("fisher")["reduction"] == "layer"
    rep = tmp_path / "report"
    assert main(["fisher", "report", str(out), "--out", str(rep)]) == 0
    text = (rep / "report.md").read_text()
    assert "effective_rank" in text and "capacity_score" in text and "| 0 |" in text
    for png in ("per_layer.png", "histogram.png", "heatmap_0.png", "heatmap_2.png"):
        assert (rep / png).stat().st_size > 1000
    assert main(["fisher", "compute", str(tmp_path / "absent"), "--out", str(out)]) == 2


def test_loader_hook_and_options(tmp_path, monkeypatch):
    (tmp_path / "my_targets.py").write_text(textwrap.dedent('''
        import torch
        from torch import nn
        from fishertune.fisher.target import FisherTarget

        def load(path, split="train", overrides=()):
            torch.manual_seed(1)
            model = nn.Sequential(nn.Embedding(9, 3), nn.Flatten(), nn.Linear(6, 4))
            x = torch.randint(0, 9, (8, 2))
            y = (torch.rand(8, 4) < 0.5).double()
            return FisherTarget(model.double(), [(x, y)], likelihood="bernoulli", name=f"{path}:{split}",
                                meta={"overrides": list(overrides)})
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = tmp_path / "G.safetensors"
    args = parser.parse_args(["fisher", "compute", "anything", "a=1", "--loader", "my_targets:load", "--split", "valid",
                              "--kind", "exact", "--storage", "cpu-fp16", "--out", str(out)])
    assert args.func(args) == 0
    store = FisherStore.load(out)
    meta = store.meta("fisher")
    assert meta["kind"] == "exact" and meta["likelihood"] == "bernoulli"
    assert meta["target"] == "anything:valid" and meta["overrides"] == ["a=1"]
    assert set(store.get("fisher")) == {"0.weight", "2.weight", "2.bias"}
