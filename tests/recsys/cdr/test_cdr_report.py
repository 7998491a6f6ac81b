"""The FisherTune experiment report: hand-made results rows with hand-computed statistics."""

from __future__ import annotations

import base64
import copy
import json
import math
import re
from io import StringIO
from pathlib import Path

import pandas as pd
import pytest

from fishertune.recsys.cdr.report import (
    ResultsError,
    budget_table,
    default_budgets,
    fisher_table,
    load_results,
    paired_comparison,
    print_summary,
    selection_table,
    summarise,
    timing_table,
    write_report,
)

SETTING = {"task": "dual-user-intra", "domains": "sport_cloth", "protocol": "sampled"}
# test NDCG@10 per preset, domain, seed 0..2 (hand-picked so mean / std / differences are exact by hand)
NDCG = {"baseline": {"sport": [0.10, 0.12, 0.14], "cloth": [0.20, 0.20, 0.23]},
        "default": {"sport": [0.11, 0.15, 0.16], "cloth": [0.19, 0.22, 0.22]}}
VALID = {"baseline": {"sport": 0.30, "cloth": 0.40}, "default": {"sport": 0.25, "cloth": 0.46}}
TIME = {"baseline": [1.0, 1.2, 1.1], "default": [1.3, 1.2, 1.4]}


def _metrics(preset: str, seed: int) -> dict:
    out = {}
    for d in ("sport", "cloth"):
        n = NDCG[preset][d][seed]
        out[d] = {"test": {"MRR": n * 0.9, "NDCG@10": n, "HR@1": n * 0.5, "HR@10": n * 1.6, "n": 8326},
                  "valid": {"MRR": VALID[preset][d] * 0.9, "NDCG@10": VALID[preset][d] + 0.001 * seed},
                  "test_full": {"NDCG@10": n / 10, "HR@10": n / 5}}
    return out


def _row(preset: str, seed: int) -> dict:
    tuned = preset != "baseline"
    history = []
    for e in range(1, 5):
        rec = {"epoch": e, "loss": 1.0 / e, "phase": "warmup" if e <= 2 or not tuned else "tune",
               "valid": {"sport": {"NDCG@10": 0.1 * e}, "cloth": {"NDCG@10": 0.05 * e}}}
        if tuned and e > 2:
            rec["threshold"] = {"shared": 0.9 - 0.1 * e, "specific": 0.8 - 0.1 * e}
            rec["ratio"] = {"shared": 0.1 * e, "specific": 0.15 * e, "all": 0.12 * e + 0.01 * seed}
        elif tuned:  # warm-up: the tuner logs threshold 0 and everything active
            rec["threshold"] = {"shared": 0.0, "specific": 0.0}
            rec["ratio"] = {"shared": 1.0, "specific": 1.0, "all": 1.0}
        else:
            rec["threshold"] = None
            rec["ratio"] = None
        history.append(rec)
    row = {"preset": preset, "seed": seed, **SETTING, "config": {"use_fishertune": tuned, "lr": 1e-3, "seed": seed},
           "run_dir": f"runs/{preset}-{seed}", "metrics": _metrics(preset, seed), "best_epoch": 3, "epochs_run": 4,
           "time_per_epoch_s": TIME[preset][seed], "fisher_time_s": 0.5 if tuned else None,
           "active_ratio": 0.35 if tuned else None, "history": history,
           "stop_reason": "time_limit" if tuned and seed == 0 else "early_stop"}
    if tuned:
        # the tuner's flat shape: <quantity>_<stat>
        row["fisher_summary"] = {g: {"fisher_mean": 2.0 + seed, "fisher_q10": 0.1, "fisher_q50": 0.5 + seed,
                                     "fisher_q90": 0.9, "fisher_max": 5.0, "drfim_mean": 3.0 + seed, "drfim_q50": 1.0,
                                     "scale": 2.0} for g in ("shared", "specific")}
        row["importance_hist"] = {g: {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [4, 3, 2, 1 + seed]}
                                  for g in ("shared", "specific")}
    return row


def _minimal(presets=("baseline", "default"), seeds=(0,)) -> list[dict]:
    """Only the required fields (no history, timings, Fisher): the report's optional parts fall away."""
    return [{"preset": p, "seed": s, "domains": "sport_cloth",
             "metrics": {d: {"test": {"NDCG@10": v + 0.01 * s, "HR@10": 2 * v}}
                         for d, v in (("sport", 0.1), ("cloth", 0.2 + 0.1 * i))}}
            for i, p in enumerate(presets) for s in seeds]


@pytest.fixture
def rows() -> list[dict]:
    return [_row(p, s) for p in ("default", "baseline") for s in range(3)]  # baseline not first on purpose


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- statistics ------------------------------------------------------------------------------------------


def test_summarise_matches_hand_computed(rows):
    frame = summarise(rows)
    assert list(frame["preset"]) == ["baseline", "default", "baseline", "default"]  # baseline first
    assert list(frame["domain"]) == ["sport", "sport", "cloth", "cloth"]
    assert list(frame["n"]) == [3, 3, 3, 3]
    by = frame.set_index(["domain", "preset"])
    assert by.loc[("sport", "baseline"), "NDCG@10_mean"] == pytest.approx(0.12)
    assert by.loc[("sport", "baseline"), "NDCG@10_std"] == pytest.approx(0.02)
    assert by.loc[("sport", "default"), "NDCG@10_mean"] == pytest.approx(0.14)
    assert by.loc[("sport", "default"), "NDCG@10_std"] == pytest.approx(math.sqrt(0.0007))
    assert by.loc[("cloth", "baseline"), "NDCG@10_mean"] == pytest.approx(0.21)
    assert by.loc[("cloth", "baseline"), "NDCG@10_std"] == pytest.approx(math.sqrt(0.0003))
    assert by.loc[("sport", "baseline"), "HR@10_mean"] == pytest.approx(0.12 * 1.6)
    assert [c for c in frame.columns if c.endswith("_mean")] == ["MRR_mean", "NDCG@10_mean", "HR@1_mean",
                                                                 "HR@10_mean"]  # "n" is a count
    full = summarise(rows, split="test_full").set_index(["domain", "preset"])
    assert full.loc[("sport", "default"), "NDCG@10_mean"] == pytest.approx(0.014)


def test_paired_comparison_matches_hand_computed(rows):
    paired = paired_comparison(rows, metrics=["NDCG@10"]).set_index("domain")
    sport = paired.loc["sport"]
    # differences 0.01, 0.03, 0.02: mean 0.02, std 0.01, t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3
    assert sport["n"] == 3 and sport["preset"] == "default"
    assert sport["mean_diff"] == pytest.approx(0.02)
    assert sport["std_diff"] == pytest.approx(0.01)
    assert sport["rel_diff"] == pytest.approx(0.02 / 0.12)
    t = 2 * math.sqrt(3)
    assert sport["t"] == pytest.approx(t)
    # Student t with 2 degrees of freedom: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2, two-sided doubles it
    assert sport["p_value"] == pytest.approx(1 - t / math.sqrt(t * t + 2))
    assert (sport["wins"], sport["losses"], sport["ties"]) == (3, 0, 0)
    cloth = paired.loc["cloth"]  # differences -0.01, 0.02, -0.01
    assert cloth["mean_diff"] == pytest.approx(0.0, abs=1e-12)
    assert cloth["std_diff"] == pytest.approx(math.sqrt(0.0003))
    assert cloth["p_value"] == pytest.approx(1.0)
    assert (cloth["wins"], cloth["losses"]) == (1, 2)


def test_paired_uses_only_shared_seeds_and_says_why_when_undefined(rows):
    rows = [r for r in rows if not (r["preset"] == "baseline" and r["seed"] == 2)]
    sport = paired_comparison(rows, metrics=["NDCG@10"]).set_index("domain").loc["sport"]
    assert sport["n"] == 2 and sport["seeds"] == "0 1"
    assert sport["mean_diff"] == pytest.approx(0.02)  # differences 0.01, 0.03
    assert sport["std_diff"] == pytest.approx(math.sqrt(0.0002))
    one = [r for r in rows if r["seed"] == 0]
    sport1 = paired_comparison(one, metrics=["NDCG@10"]).set_index("domain").loc["sport"]
    assert sport1["n"] == 1 and sport1["mean_diff"] == pytest.approx(0.01)
    assert math.isnan(sport1["std_diff"]) and math.isnan(sport1["p_value"])
    assert "undefined" in sport1["note"]
    same = copy.deepcopy([r for r in rows if r["seed"] in (0, 1)])
    for r in same:  # default = baseline + 0.05 on every seed: differences all equal
        if r["preset"] == "default":
            r["metrics"]["sport"]["test"]["NDCG@10"] = NDCG["baseline"]["sport"][r["seed"]] + 0.05
    eq = paired_comparison(same, metrics=["NDCG@10"]).set_index("domain").loc["sport"]
    assert eq["mean_diff"] == pytest.approx(0.05) and eq["std_diff"] == pytest.approx(0.0, abs=1e-12)
    assert "same amount" in eq["note"] and math.isnan(eq["p_value"])


def test_selection_names_the_validation_pick(rows):
    sel = selection_table(rows, "NDCG@10").set_index("domain")
    # sport: baseline best on validation (0.30 > 0.25), default best on test (0.14 > 0.12)
    assert sel.loc["sport", "best_on_valid"] == "baseline"
    assert sel.loc["sport", "valid_pick_test"] == pytest.approx(0.12)
    assert sel.loc["sport", "best_on_test"] == "default"
    assert not sel.loc["sport", "agree"]
    assert sel.loc["cloth", "best_on_valid"] == "default"
    # mean over the two domains: valid baseline (0.301 + 0.401) / 2 = 0.351 < default (0.251 + 0.461) / 2 = 0.356;
    # test baseline (0.12 + 0.21) / 2 = 0.165 < default (0.14 + 0.21) / 2 = 0.175
    assert sel.loc["(mean)", "best_on_valid"] == "default" and sel.loc["(mean)", "agree"]
    assert sel.loc["(mean)", "valid_pick_valid"] == pytest.approx(0.356)
    assert sel.loc["(mean)", "valid_pick_test"] == pytest.approx(0.175)


def _curve_row(preset: str, seed: int, curve: list[float], why: str | None) -> dict:
    """A run logging validation NDCG@10 ``v`` (sport) and ``v + 0.1`` (cloth) at epochs 1, 2, ..."""
    return {"preset": preset, "seed": seed, **SETTING, "stop_reason": why,
            "history": [{"epoch": e + 1, "valid": {"sport": {"NDCG@10": v}, "cloth": {"NDCG@10": v + 0.1}}}
                        for e, v in enumerate(curve)]}


def test_budget_table_counts_a_cut_run_only_up_to_its_last_epoch():
    rows = [_curve_row("baseline", 0, [0.1, 0.3, 0.2], "early_stop"),  # stopped early: counts at every budget
            _curve_row("baseline", 1, [0.2, 0.2, 0.4, 0.5], "time_limit"),
            _curve_row("default", 0, [0.1, 0.5], "time_limit"),  # cut at epoch 2
            _curve_row("default", 1, [0.3], None)]  # killed (no row of its own): counts up to epoch 1
    t = budget_table(rows, budgets=[4, 1, 2]).set_index(["preset", "budget"])
    assert list(t.index) == [("baseline", 1), ("baseline", 2), ("baseline", 4), ("default", 1), ("default", 2),
                             ("default", 4)]
    # best of the domain mean (v + 0.05) within the first E epochs, over the runs that count at E
    expect = {("baseline", 1): [0.15, 0.25], ("baseline", 2): [0.35, 0.25], ("baseline", 4): [0.35, 0.55],
              ("default", 1): [0.15, 0.35], ("default", 2): [0.55], ("default", 4): []}
    for key, vals in expect.items():
        r = t.loc[key]
        assert (r["n"], r["runs"]) == (len(vals), 2), key
        if vals:
            assert r["mean"] == pytest.approx(sum(vals) / len(vals)), key
        else:
            assert math.isnan(r["mean"]), key
    assert t.loc[("baseline", 1), "std"] == pytest.approx(math.sqrt(2 * 0.05**2))
    assert math.isnan(t.loc[("default", 2), "std"])  # one run: no std
    assert default_budgets(rows) == [1, 2, 3]  # 1/4, 2/4, 3/4 of the longest history (4 epochs)


def test_timing_ratio_and_fisher_summary(rows):
    timing = timing_table(rows).set_index("preset")
    assert timing.loc["baseline", "time_per_epoch_s_mean"] == pytest.approx(1.1)
    assert timing.loc["default", "time_per_epoch_s_mean"] == pytest.approx(1.3)
    assert timing.loc["default", "time_per_epoch_s_std"] == pytest.approx(0.1)
    assert timing.loc["default", "ratio_to_baseline"] == pytest.approx(1.3 / 1.1)
    assert math.isnan(timing.loc["baseline", "fisher_time_s_mean"])  # null for the baseline: tolerated
    n_default = sum(r["preset"] == "default" for r in rows)
    assert timing.loc["default", "stopped"] == f"{n_default - 1} early_stop, 1 time_limit"
    assert timing_table(_minimal()).loc[0, "stopped"] == ""  # rows without stop_reason
    ft = fisher_table(rows)
    assert set(ft["preset"]) == {"default"} and list(ft.columns[-6:]) == ["mean", "q10", "q50", "q90", "max", "value"]
    shared = ft[ft["group"] == "shared"].set_index("quantity")
    assert list(shared.index) == ["fisher", "drfim", "scale"]  # a logged scale: no drfim / fisher ratio
    assert shared.loc["fisher", "mean"] == pytest.approx(3.0)  # seeds: 2, 3, 4
    assert shared.loc["fisher", "q50"] == pytest.approx(1.5)  # 0.5, 1.5, 2.5
    assert shared.loc["drfim", "mean"] == pytest.approx(4.0) and math.isnan(shared.loc["drfim", "q10"])
    assert shared.loc["scale", "value"] == pytest.approx(2.0)
    nested = copy.deepcopy(rows)  # the nested shape {fisher_mean, drfim_mean, quantiles: {q10, ...}} reads too
    for r in nested:
        if "fisher_summary" in r:
            r["fisher_summary"] = {"shared": {"fisher_mean": 1.0, "drfim_mean": 0.5, "quantiles": {"q10": 0.2}}}
    ft = fisher_table(nested).set_index("quantity")
    assert ft.loc["quantiles", "q10"] == pytest.approx(0.2)
    assert ft.loc["drfim / fisher", "mean"] == pytest.approx(0.5)
    for r in nested:  # with the domain-shift term logged: its share of DR-FIM
        if "fisher_summary" in r:
            r["fisher_summary"]["shared"].update(drfim_extra_mean=0.1 * (1 + r["seed"]))  # 0.1, 0.2, 0.3
    ft = fisher_table(nested).set_index("quantity")
    assert ft.loc["drfim_extra / drfim", "mean"] == pytest.approx(0.2 / 0.5)
    assert "drfim / fisher" not in ft.index


def test_threshold_curve_skips_warmup(rows):
    from fishertune.recsys.cdr.report import _history_series

    default = [r for r in rows if r["preset"] == "default"]
    assert [sorted(s) for s in _history_series(default, "threshold", "shared")] == [[3, 4]] * 3
    assert [sorted(s) for s in _history_series(default, "ratio", "all")] == [[1, 2, 3, 4]] * 3
    assert _history_series([r for r in rows if r["preset"] == "baseline"], "ratio", "all") == []


def test_print_summary(rows):
    from rich.console import Console

    buf = StringIO()
    frame = print_summary(rows, console=Console(file=buf, width=200))
    text = buf.getvalue()
    assert "baseline" in text and "default" in text and "0.1400 ± 0.0265" in text
    assert len(frame) == 4


# -- the report files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    rows = [_row(p, s) for p in ("default", "baseline") for s in range(3)]
    write_report(_jsonl(tmp / "results.jsonl", rows), tmp / "out")
    return tmp / "out"


def test_report_files_and_opening_table(report_dir):
    for name in ("report.md", "report.html", "summary.csv", "paired.csv", "timing.csv", "selection.csv", "budget.csv"):
        assert (report_dir / name).is_file(), name
    md = (report_dir / "report.md").read_text()
    lines = md.splitlines()
    assert lines[0].startswith("# ")
    first_table = next(i for i, line in enumerate(lines) if line.startswith("|"))
    assert first_table < 8  # opens with the short results table
    assert lines[first_table].startswith("| preset | sport | cloth |")
    assert lines[first_table + 2].startswith("| baseline |")  # baseline first
    assert "**0.1400 ± 0.0265**" in md  # best sport NDCG@10 in bold
    summary = pd.read_csv(report_dir / "summary.csv")
    assert set(summary["split"]) == {"test", "test_full", "valid"}
    assert "Paired comparison against baseline" in md
    assert "dual-user-intra sport_cloth: **default** is best on validation and on test" in md
    # equal budgets (1, 2, 3 of 4 epochs): at E = 3 all three runs of each preset count, valid mean 0.225
    assert "within equal epoch budgets" in md
    assert "| sport_cloth | default | 0.0750 ± 0.0000 (3/3) | 0.1500 ± 0.0000 (3/3) | 0.2250 ± 0.0000 (3/3) |" in md
    for png in report_dir.glob("*.png"):
        assert f"]({png.name})" in md


def test_html_is_self_contained(report_dir):
    html = (report_dir / "report.html").read_text()
    pngs = sorted(report_dir.glob("*.png"))
    assert len(pngs) >= 6  # bar charts (test + test_full), curves, validation curves, histograms, quantiles
    images = re.findall(r'<img[^>]*src="data:image/png;base64,([^"]+)"', html)
    assert len(images) == len(pngs)
    assert {base64.b64decode(i) for i in images} == {p.read_bytes() for p in pngs}
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert not re.search(r"https?://", html)
    assert all(b"matplotlib.org" not in base64.b64decode(i) for i in images)  # no URL in PNG metadata either
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", html)
    assert "<link" not in html and "<script" not in html and "<style>" in html


# -- bad and partial input -------------------------------------------------------------------------------


def test_missing_required_field_names_line_and_field(tmp_path, rows):
    bad = copy.deepcopy(rows[:3])
    del bad[2]["metrics"]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(bad[0]) + "\n\n" + json.dumps(bad[1]) + "\n" + json.dumps(bad[2]) + "\n")
    with pytest.raises(ResultsError, match=r"line 4: required field 'metrics' is missing"):
        load_results(path)
    for mutate, pattern in [(lambda r: r.pop("preset"), "line 1: required field 'preset'"),
                            (lambda r: r.update(seed="zero"), "line 1: field 'seed' must be an integer"),
                            (lambda r: r["metrics"]["cloth"].pop("test"), r"line 1: field 'metrics.cloth.test'"),
                            (lambda r: r["metrics"]["sport"]["test"].update(MRR="high"),
                             r"line 1: field 'metrics.sport.test.MRR' must be a number")]:
        r = copy.deepcopy(rows[0])
        mutate(r)
        _jsonl(path, [r])
        with pytest.raises(ResultsError, match=pattern):
            load_results(path)
    path.write_text(json.dumps(rows[0]) + "\n{not json}\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(ResultsError, match="line 2: not valid JSON"):
        load_results(path)
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1])[:50] + "\n")  # a torn last line: skipped
    loaded = load_results(path)
    assert len(loaded) == 1 and "line 2: a torn last line" in loaded[0]["_notes"][0]
    path.write_text("\n")
    with pytest.raises(ResultsError, match="no runs in"):
        write_report(path, tmp_path / "out")


def test_single_seed_and_minimal_rows(tmp_path):
    minimal = _minimal()
    frame = summarise(minimal)
    assert list(frame["n"]) == [1, 1, 1, 1] and frame["NDCG@10_std"].isna().all()
    original = copy.deepcopy(minimal[:1])  # the original code's protocol is a setting of its own
    original[0]["protocol"] = "original"
    assert len(summarise(minimal + original)) == 6
    md = write_report(_jsonl(tmp_path / "r.jsonl", minimal + original), tmp_path / "out").read_text()
    assert "| sport_cloth [original] | sport | baseline | 1 | 0.1000 | 0.2000 |" in md  # alone: not bold
    assert "picks the epoch on the test set" in md
    assert "n=1 shared seed: std and paired t-test undefined" in md
    assert "No validation NDCG@10" in md and "No time_per_epoch_s" in md
    assert "No preset logged thresholds" in md and "No fisher_summary or importance_hist" in md
    assert (tmp_path / "out" / "report.html").is_file()


def test_baseline_missing_still_writes_report(tmp_path):
    only = _minimal(presets=("default", "aggressive_specific"), seeds=(0, 1))
    md = write_report(only, tmp_path / "out").read_text()
    assert "No runs of the baseline preset 'baseline' in the results (presets present: default, " \
           "aggressive_specific)" in md
    assert (tmp_path / "out" / "report.html").is_file()
    assert pd.read_csv(tmp_path / "out" / "paired.csv").empty
    # another baseline named on the command line is honoured
    paired = paired_comparison(only, baseline="default", metrics=["NDCG@10"]).set_index("domain")
    assert paired.loc["cloth", "preset"] == "aggressive_specific"
    assert paired.loc["cloth", "mean_diff"] == pytest.approx(0.1)


def test_duplicates_keep_the_last_and_bad_optional_fields_are_noted(tmp_path):
    rows = _minimal(seeds=(0, 1, 2))
    again = copy.deepcopy(rows[3])  # default seed 0 appended twice (a resumed run)
    again["metrics"]["sport"]["test"]["NDCG@10"] = 0.5
    again["history"] = "not a list"
    loaded = load_results(_jsonl(tmp_path / "r.jsonl", [*rows, again]))
    assert len(loaded) == 6
    by = summarise(loaded).set_index(["domain", "preset"])
    assert by.loc[("sport", "default"), "NDCG@10_mean"] == pytest.approx((0.5 + 0.11 + 0.12) / 3)
    md = write_report(loaded, tmp_path / "out").read_text()
    assert "1 duplicate run(s) (same preset, seed and setting) dropped, the last of each kept: " in md
    assert "r.jsonl line 4" in md  # the dropped one
    assert "optional field 'history' has type str; ignored" in md
    again["config"] = {"lr": 0.1}  # a different configuration under the same preset name is pointed out
    loaded = load_results(_jsonl(tmp_path / "r.jsonl", [*rows, again]))
    assert "1 of them had a different config" in loaded[0]["_notes"][0]


def test_parquet_reads_like_jsonl(tmp_path, rows):
    path = tmp_path / "r.parquet"
    other = copy.deepcopy(rows[:2])  # a second pair in the same file: Parquet nulls the other pair's domains
    for r in other:
        r["domains"] = "phone_electronic"
        r["metrics"] = {"phone": r["metrics"]["sport"], "electronic": r["metrics"]["cloth"]}
    rows = rows + other
    pd.DataFrame(rows).to_parquet(path, index=False)
    from_parquet = load_results(path)
    from_jsonl = load_results(_jsonl(tmp_path / "r.jsonl", rows))
    pd.testing.assert_frame_equal(summarise(from_parquet), summarise(from_jsonl))
    pd.testing.assert_frame_equal(timing_table(from_parquet), timing_table(from_jsonl))
    pd.testing.assert_frame_equal(fisher_table(from_parquet), fisher_table(from_jsonl))


def test_cli(tmp_path, capsys):
    from fishertune.cli import main

    path = _jsonl(tmp_path / "r.jsonl", _minimal(seeds=(0, 1)))
    assert main(["report", str(path), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert "report:" in capsys.readouterr().out
    assert main(["report", str(path), "--out", str(tmp_path / "o2"), "--metric", "NDCG@20"]) == 2
    assert "NDCG@20" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o3")]) == 2
    assert main(["report", str(path), "--out", str(tmp_path / "o4"), "--budgets", "2,x"]) == 2
    assert "--budgets" in capsys.readouterr().out


def test_refit_rows_are_their_own_preset(tmp_path, rows):
    """A refit (``data.holdout=false``: no validation) is reported as ``<preset> (refit)``, paired
    against the baseline like any preset and left out of the validation pick; the report still writes."""
    refits = []
    for s in range(3):
        r = _row("baseline", s)
        r["config"] = {**r["config"], "data": {"holdout": False}}
        r["metrics"] = {d: {k: v for k, v in m.items() if k != "valid"} for d, m in r["metrics"].items()}
        for d in ("sport", "cloth"):
            r["metrics"][d]["test"]["NDCG@10"] += 0.01
        r["history"] = [{k: v for k, v in h.items() if k != "valid"} for h in r["history"]]
        refits.append(r)
    table = summarise(rows + refits).set_index(["domain", "preset"])
    assert table.loc[("sport", "baseline (refit)"), "NDCG@10_mean"] == pytest.approx(0.13)
    assert table.loc[("sport", "baseline"), "NDCG@10_mean"] == pytest.approx(0.12)
    paired = paired_comparison(rows + refits).set_index(["domain", "metric", "preset"])
    assert paired.loc[("cloth", "NDCG@10", "baseline (refit)"), "mean_diff"] == pytest.approx(0.01)
    sel = selection_table(rows + refits, "NDCG@10").set_index("domain")
    assert sel.loc["sport", "best_on_valid"] == "baseline" and not sel["best_on_valid"].str.contains("refit").any()
    write_report(rows + refits, tmp_path / "r")
    assert "baseline (refit)" in (tmp_path / "r" / "report.md").read_text()
