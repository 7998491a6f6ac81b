"""``fishertune finetune``: config errors, the comparison table and plot, resume (fishertune.tune.finetune)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_smalldata import Tiny, _data, _model

from fishertune.cli import main
from fishertune.tune import finetune as ft
from fishertune.utils.settings import data_root


def _fake_task(data, device):
    x, y = _data(n_per_class=12, seed=0)
    tx, ty = _data(n_per_class=10, seed=1)
    xb = (x * 255).to(torch.uint8)
    from fishertune.zoo import disjoint_draws

    model = _model().to(device)
    return ft.Task("tiny", model, xb.to(device), y.to(device), (tx * 255).to(torch.uint8).to(device), ty.to(device),
                   lambda aug: ft.image_transform(aug), lambda seeds: disjoint_draws(y, data.k, seeds))


def _config(tmp_path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"""
name: tiny
data: {{k: 3, draws: [0, 1]}}
train: {{epochs: 2, batch_size: 6, folds: 3, augment: [flip]}}
strategies:
  head_only: {{train: {{lr_grid: [0.5]}}}}
  bn_adapt: {{bn_adapt: {{alpha: 0.5}}}}
  mine: {{base: norm_only, train: {{lr_grid: [0.1], selection: fixed_guarded, lr: 0.1}}}}
output_dir: {tmp_path / 'runs'}
{extra}""")
    return cfg


def test_compare_all_writes_table_plot_deltas_and_resumes(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ft, "load_task", _fake_task)
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    assert main(["finetune", str(cfg), "--compare", "all", "--out", str(out), "device=cpu"]) == 0
    cells = sorted(p.name for p in (out / "cells").glob("*.json"))
    assert cells == [f"{s}__draw{d}.json" for s in ("bn_adapt", "head_only", "mine") for d in (0, 1)]
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["strategy"]: r for r in summary["rows"]}
    assert set(rows) == {"untouched", "head_only", "bn_adapt", "mine"}
    assert rows["head_only"]["draws"] == 2 and rows["head_only"]["trainable"] == 6 * 3 + 3
    for name in ("head_only", "bn_adapt", "mine"):
        cs = [json.loads((out / "cells" / f"{name}__draw{d}.json").read_text()) for d in (0, 1)]
        mean = sum(c["test_acc"] for c in cs) / 2
        assert rows[name]["acc_mean"] == pytest.approx(mean)
        assert rows[name]["delta_mean"] == pytest.approx(mean - summary["untouched"]["test_acc"])
        for c in cs:   # deltas exist exactly for cells whose fine-tuned model was kept
            assert (out / "deltas" / f"{name}__draw{c['draw']}.safetensors").is_file() == (not c["kept_base"])
            assert c["n_labelled"] == 9
    assert "| head_only | 2 |" in (out / "summary.md").read_text()
    assert (out / "summary.csv").read_text().startswith("strategy,")
    assert (out / "accuracy_vs_params.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file()
    # run again: every cell is skipped, nothing recomputed
    stamp = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    capsys.readouterr()
    assert main(["finetune", str(cfg), "--compare", "all", "--out", str(out), "device=cpu"]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 6
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    # a changed strategy setting recomputes only its cells
    assert main(["finetune", str(cfg), "--strategy", "head_only", "--out", str(out), "device=cpu",
                 "strategies.head_only.train.lr_grid=[0.3]"]) == 0
    assert stamp[out / "cells" / "mine__draw0.json"] == (out / "cells" / "mine__draw0.json").stat().st_mtime_ns
    assert stamp[out / "cells" / "head_only__draw0.json"] != (out / "cells" / "head_only__draw0.json").stat().st_mtime_ns


def test_delta_from_the_runner_reloads_to_the_same_predictions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ft, "load_task", _fake_task)
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    assert main(["finetune", str(cfg), "--strategy", "head_only", "--out", str(out), "device=cpu",
                 "strategies.head_only.train.guard=false", "data.draws=[0]"]) == 0
    from fishertune.tune.delta import load_delta

    model = _model()
    info = load_delta(out / "deltas" / "head_only__draw0.safetensors", model)
    cell = json.loads((out / "cells" / "head_only__draw0.json").read_text())
    task = _fake_task(ft.DataConfig(k=3), torch.device("cpu"))
    acc = ft._accuracy(model, task.test_x, task.test_y, ft.image_transform([]))
    assert acc == cell["test_acc"] == info["meta"]["test_acc"]


def test_config_errors_exit_2_naming_the_key(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, "devise: cpu\n")
    assert main(["finetune", str(cfg), "--compare", "all"]) == 2
    assert "unknown key 'devise'" in capsys.readouterr().out
    cfg = _config(tmp_path)
    assert main(["finetune", str(cfg), "--strategy", "nope"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().out
    assert main(["finetune", str(cfg), "--compare", "all", "strategies.head_only.rulez=[]"]) == 2
    assert "unknown key 'rulez'" in capsys.readouterr().out
    assert main(["finetune", str(cfg), "--compare", "all", "train.epoch=3"]) == 2
    assert "unknown key 'epoch'" in capsys.readouterr().out
    assert main(["finetune", str(cfg)]) == 2
    assert "--strategy" in capsys.readouterr().out


def test_device_cuda_is_refused_clearly_without_a_gpu(tmp_path: Path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["finetune", str(_config(tmp_path)), "--compare", "all", "device=cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().out


def test_tiny_model_roles_are_used() -> None:
    assert Tiny.ROLES["head"] == ("linear",)


@pytest.mark.slow
def test_real_resnet20_jpeg_smoke(tmp_path: Path) -> None:
    if not (data_root() / "vision" / "resnet20.safetensors").is_file():
        pytest.skip("vision data not under FISHERTUNE_DATA")
    out = tmp_path / "out"
    cfg = Path(__file__).resolve().parents[2] / "configs" / "finetune" / "resnet56-jpeg.yaml"
    assert main(["finetune", str(cfg), "--strategy", "head_only,bn_adapt", "--out", str(out), "device=cpu",
                 "data.depth=20", "data.k=1", "data.draws=[0]", "data.test_limit=5", "data.unlabelled=20",
                 "train.epochs=1", "train.folds=2", "train.guard_resplit=false"]) == 0
    rows = {r["strategy"]: r for r in json.loads((out / "summary.json").read_text())["rows"]}
    assert rows["untouched"]["acc_mean"] > 0.3 and set(rows) == {"untouched", "head_only", "bn_adapt"}


def test_draws_option_splits_the_work_into_the_same_cells(tmp_path: Path, monkeypatch, capsys) -> None:
    """One process per draw (``--draws``) gives the cells one process over all draws gives."""
    monkeypatch.setattr(ft, "load_task", _fake_task)
    cfg = _config(tmp_path)
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["finetune", str(cfg), "--strategy", "head_only", "--out", str(whole), "device=cpu"]) == 0
    assert main(["finetune", str(cfg), "--strategy", "head_only", "--out", str(split), "device=cpu",
                 "--draws", "1", "data.k=3"]) == 0  # overrides may follow --draws
    assert sorted(p.name for p in (split / "cells").glob("*.json")) == ["head_only__draw1.json"]
    assert main(["finetune", str(cfg), "--strategy", "head_only", "--out", str(split), "device=cpu",
                 "--draws", "0,1"]) == 0
    for d in (0, 1):
        a, b = (json.loads((o / "cells" / f"head_only__draw{d}.json").read_text()) for o in (whole, split))
        assert (a["key"], a["test_acc"], a["lr"], a["epochs"]) == (b["key"], b["test_acc"], b["lr"], b["epochs"])
    capsys.readouterr()
    assert main(["finetune", str(cfg), "--strategy", "head_only", "--out", str(split), "--draws", "7"]) == 2
    captured = capsys.readouterr()
    assert "not in data.draws" in captured.out + captured.err
