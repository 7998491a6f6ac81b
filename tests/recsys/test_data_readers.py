"""Readers: hand-made files against a plain-Python parse, bad input, duplicates, real-data counts."""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fishertune.recsys.data import (DataFormatError, Interactions, IdMap, deduplicate, negatives_matrix,
                                    read_cross_domain, read_movielens_1m, read_movielens_100k, read_negatives,
                                    read_sequences, read_table)
from fishertune.recsys.data._sort import order_by
from fishertune.recsys.data.readers import id_map

ROWS = [(196, 242, 3, 881250949), (186, 302, 3.5, 891717742), (22, 377, 1, 878887116),
        (196, 51, 2, 880606923), (7, 242, 5, 886397596)]


def as_tuples(inter: Interactions) -> list[tuple]:
    """Rows back in original IDs, the way a plain loop would see them."""
    out = []
    for k in range(len(inter)):
        row = (inter.user_ids.ids[inter.users[k]].item(), inter.item_ids.ids[inter.items[k]].item())
        if inter.ratings is not None:
            row += (float(inter.ratings[k]),)
        if inter.timestamps is not None:
            row += (int(inter.timestamps[k]),)
        out.append(row)
    return out


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- MovieLens ----------------------------------------------------------------------------------------


def test_ml100k_matches_plain_parse(tmp_path):
    f = write(tmp_path / "u.data", "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ROWS))
    inter = read_movielens_100k(tmp_path)  # a folder works, as does the file
    assert as_tuples(inter) == [(u, i, float(r), t) for u, i, r, t in ROWS]
    assert list(inter.user_ids.ids) == [7, 22, 186, 196] and inter.n_items == 4
    assert inter.users.dtype == np.int64 and inter.ratings.dtype == np.float32
    assert as_tuples(read_movielens_100k(f)) == as_tuples(inter)


@pytest.mark.parametrize("gz", [False, True])
def test_ml1m_double_colon_and_gzip(tmp_path, gz):
    text = "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ROWS)
    if gz:
        (tmp_path / "ratings.dat.gz").write_bytes(gzip.compress(text.encode()))
    else:
        write(tmp_path / "ratings.dat", text)
    inter = read_movielens_1m(tmp_path)
    assert as_tuples(inter) == [(u, i, float(r), t) for u, i, r, t in ROWS]
    assert inter.name == "ml-1m"


@pytest.mark.parametrize("bad, reason", [
    ("1\t2\t3\n", "field"),                 # too few fields
    ("1\t2\t3\t4\t5\n", "expected 4 fields"),  # too many
    ("1\t2\tgood\t4\n", "rating"),          # non-numeric rating
    ("1\tx\t3\t4\n", "item"),               # non-numeric id
])
def test_ml100k_malformed_line_names_file_and_line(tmp_path, bad, reason):
    f = write(tmp_path / "u.data", "1\t2\t3\t4\n5\t6\t4\t7\n" + bad + "8\t9\t1\t2\n")
    with pytest.raises(DataFormatError) as exc:
        read_movielens_100k(f)
    msg = str(exc.value)
    assert f"{f}:3:" in msg and reason in msg


def test_ml1m_malformed_line_number(tmp_path):
    f = write(tmp_path / "ratings.dat", "1::2::3::4\n1::3::3\n")
    with pytest.raises(DataFormatError, match=r"ratings\.dat:2:"):
        read_movielens_1m(f)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="u.data"):
        read_movielens_100k(tmp_path)


# -- duplicates ---------------------------------------------------------------------------------------


def _dup_log() -> Interactions:
    users = np.array([0, 0, 1, 0, 1, 0])
    items = np.array([0, 1, 0, 0, 0, 0])
    times = np.array([5, 1, 3, 9, 2, 7])
    return Interactions(users, items, IdMap(np.array([10, 11])), IdMap(np.array([20, 21])),
                        np.arange(6, dtype=np.float32), times, "dup")


def brute_dedupe(inter: Interactions, last: bool) -> list[int]:
    best: dict[tuple, int] = {}
    for k in range(len(inter)):
        key = (inter.users[k], inter.items[k])
        j = best.get(key)
        t_k, t_j = inter.timestamps[k], None if j is None else inter.timestamps[j]
        if j is None or (t_k >= t_j if last else t_k < t_j):
            best[key] = k
    return sorted(best.values())


@pytest.mark.parametrize("policy", ["keep_last", "keep_first"])
def test_deduplicate_by_time(policy, caplog):
    inter = _dup_log()
    with caplog.at_level(logging.WARNING, logger="fishertune.data"):
        out, n = deduplicate(inter, policy)
    expect = brute_dedupe(inter, policy == "keep_last")
    assert n == 3 and list(out.ratings.astype(int)) == expect  # ratings hold the row number
    assert "dropped 3 duplicate" in caplog.text
    # hand check: (u0,i0) rows 0,3,5 at times 5,9,7 -> last by time is row 3, first is row 0
    assert (3 if policy == "keep_last" else 0) in expect


def test_deduplicate_error_and_keep_all():
    with pytest.raises(DataFormatError, match="duplicate.*user 10, item 20"):
        deduplicate(_dup_log(), "error")
    out, n = deduplicate(_dup_log(), "keep_all")
    assert n == 0 and len(out) == 6
    with pytest.raises(ValueError, match="unknown duplicate policy"):
        deduplicate(_dup_log(), "newest")


def test_reader_applies_duplicate_policy(tmp_path):
    f = write(tmp_path / "u.data", "1\t2\t3\t100\n1\t2\t5\t50\n2\t2\t4\t10\n")
    assert as_tuples(read_movielens_100k(f)) == [(1, 2, 3.0, 100), (2, 2, 4.0, 10)]
    assert as_tuples(read_movielens_100k(f, duplicates="keep_first")) == [(1, 2, 5.0, 50), (2, 2, 4.0, 10)]


# -- generic tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "csv.gz"])
def test_generic_formats(tmp_path, fmt):
    frame = pd.DataFrame({"uid": ["a", "b", "a"], "iid": [3, 1, 2], "score": [1.0, 2.5, 4.0],
                          "ts": [30, 10, 20], "extra": ["x", "y", "z"]})
    path = tmp_path / f"log.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False)
    inter = read_table(path, user="uid", item="iid", rating="score", timestamp="ts")
    assert as_tuples(inter) == [("a", 3, 1.0, 30), ("b", 1, 2.5, 10), ("a", 2, 4.0, 20)]
    assert inter.item_ids.ids.dtype == np.int64


def test_generic_optional_columns(tmp_path):
    f = write(tmp_path / "a.csv", "user,item\n1,2\n3,4\n")
    inter = read_table(f)  # default-named rating / timestamp may be absent
    assert inter.ratings is None and inter.timestamps is None and len(inter) == 2
    with pytest.raises(DataFormatError, match="no column 'when'.*columns are \\['user', 'item'\\]"):
        read_table(f, timestamp="when")  # an explicitly named column must exist
    with pytest.raises(DataFormatError, match="no column 'uid' \\(the user column\\)"):
        read_table(f, user="uid")


def test_generic_bad_values(tmp_path):
    f = write(tmp_path / "a.csv", "user,item,rating\n1,2,3\n4,5,great\n")
    with pytest.raises(DataFormatError, match=r"a\.csv:3: non-numeric rating 'great'"):
        read_table(f)
    g = write(tmp_path / "b.csv", "user,item,rating\n1,2,3\n,5,1\n")
    with pytest.raises(DataFormatError, match=r"b\.csv:3: missing value in column 'user'"):
        read_table(g)
    h = write(tmp_path / "c.csv", "user,item\n1,2\n1,2,3,4\n")
    with pytest.raises(DataFormatError, match=r"c\.csv:3:"):
        read_table(h)
    with pytest.raises(DataFormatError, match="cannot tell the format"):
        read_table(write(tmp_path / "d.dat", "user,item\n1,2\n"))


def test_generic_date_timestamps(tmp_path):
    f = write(tmp_path / "a.csv", "user,item,timestamp\n1,2,2020-01-01T00:00:10Z\n1,3,1970-01-01 00:01:00\n")
    assert list(read_table(f).timestamps) == [1577836810, 60]
    g = write(tmp_path / "b.csv", "user,item,timestamp\n1,2,yesterday\n")
    with pytest.raises(DataFormatError, match=r"b\.csv:2: timestamp 'yesterday'"):
        read_table(g)


# -- sequences and negatives ---------------------------------------------------------------------------


def test_sequences_positions(tmp_path):
    f = write(tmp_path / "s.txt", "1 10 11 12\n\n2 11 13\n3 10\n")
    inter = read_sequences(f)
    assert as_tuples(inter) == [(1, 10, 0), (1, 11, 1), (1, 12, 2), (2, 11, 0), (2, 13, 1), (3, 10, 0)]
    assert inter.ratings is None


def test_sequences_errors(tmp_path):
    with pytest.raises(DataFormatError, match=r"s\.txt:2: non-integer id 'x'"):
        read_sequences(write(tmp_path / "s.txt", "1 10 11\n2 x 12\n"))
    with pytest.raises(DataFormatError, match="user 1 appears on lines 1 and 3"):
        read_sequences(write(tmp_path / "t.txt", "1 10\n2 11\n1 12\n"))


def test_negatives_and_matrix(tmp_path):
    f = write(tmp_path / "n.txt", "1 5 6 7\n2 7 8 9\n")
    neg = read_negatives(f)
    assert set(neg) == {1, 2} and list(neg[2]) == [7, 8, 9]
    users, items = IdMap(np.array([1, 2, 3])), IdMap(np.arange(4, 10))
    mat = negatives_matrix(neg, users, items)
    assert mat.tolist() == [[1, 2, 3], [3, 4, 5], [-1, -1, -1]]


# -- cross-domain ---------------------------------------------------------------------------------------


def _pair(root: Path, scenario: str, files: dict[str, dict[str, str]]) -> Path:
    for folder, splits in files.items():
        d = root / scenario / folder
        d.mkdir(parents=True)
        for split, text in splits.items():
            write(d / f"{split}.txt", text)
    return root / scenario / next(iter(files))


def test_cross_domain_intra(tmp_path):
    a_b = _pair(tmp_path, "dual-user-intra", {
        "sport_cloth": {"train": "0\t5\t1\n1\t6\t1\n", "test": "0\t7\t1\n"},
        "cloth_sport": {"train": "0\t50\t1\n2\t51\t1\n", "test": "1\t52\t1\n"}})
    data = read_cross_domain(a_b)
    assert data.domains == ("sport", "cloth") and data.n_users == 3 and data.shared.all()
    assert list(data.item_ids["sport"].ids) == [5, 6, 7] and list(data.item_ids["cloth"].ids) == [50, 51, 52]
    assert as_tuples(data.get("cloth", "test")) == [(1, 52)]
    assert data.get("sport", "train").user_ids is data.get("cloth", "train").user_ids
    with pytest.raises(KeyError, match="no split 'valid'"):
        data.get("sport", "valid")


def test_cross_domain_inter_shared_users(tmp_path):
    # users 0..2 shared (2 is cold-start in sport, 1 in cloth); 3 is a different person in each domain
    a_b = _pair(tmp_path, "dual-user-inter", {
        "sport_cloth": {"train": "0\t1\n1\t2\n3\t1\n", "valid": "2\t1\n", "test": "2\t2\n"},
        "cloth_sport": {"train": "0\t9\n2\t8\n3\t8\n", "valid": "1\t9\n", "test": "1\t8\n"}})
    data = read_cross_domain(a_b)
    assert sorted(data.user_ids.ids) == ["0", "1", "2", "cloth:3", "sport:3"]
    assert int(data.shared.sum()) == 3
    sport_u = set(data.user_ids.ids[data.get("sport", "train").users])
    cloth_u = set(data.user_ids.ids[data.get("cloth", "train").users])
    assert sport_u == {"0", "1", "sport:3"} and cloth_u == {"0", "2", "cloth:3"}
    bad = _pair(tmp_path / "x", "dual-user-inter", {
        "a_b": {"train": "0\t1\n", "valid": "1\t1\n"}, "b_a": {"train": "0\t1\n"}})
    with pytest.raises(DataFormatError, match="no training data"):
        read_cross_domain(bad)


# -- real data (skipped without FISHERTUNE_DATA) ----------------------------------------------------------


def test_real_movielens(data_root):
    m100 = read_movielens_100k(data_root("ml-100k"))
    assert (m100.n_users, m100.n_items, len(m100)) == (943, 1682, 100000)
    m1 = read_movielens_1m(data_root("ml-1m"))
    assert (m1.n_users, m1.n_items, len(m1)) == (6040, 3706, 1000209)
    assert set(np.unique(m1.ratings)) == {1, 2, 3, 4, 5}


def test_real_sequences_and_negatives(data_root):
    seq = data_root("seq")
    beauty = read_sequences(seq / "Beauty.txt")
    assert (beauty.n_users, beauty.n_items, len(beauty)) == (22363, 12101, 198502)
    lastfm = read_sequences(seq / "LastFM.txt")
    assert (lastfm.n_users, lastfm.n_items, len(lastfm)) == (1090, 3646, 52551)
    neg = negatives_matrix(read_negatives(seq / "LastFM_sample.txt"), lastfm.user_ids, lastfm.item_ids)
    assert neg.shape == (1090, 99) and (neg >= 0).all()


def test_real_cross_domain(data_root):
    intra = read_cross_domain(data_root("cdr/dual-user-intra/sport_cloth"))
    assert intra.n_users == 9928 and intra.shared.all()
    assert len(intra.get("sport", "test_original")) == 9928 and len(intra.get("sport", "test")) == 8326
    assert len(np.unique(intra.get("sport", "train").items)) == 30796
    assert len(np.unique(intra.get("cloth", "train").items)) == 39008
    inter = read_cross_domain(data_root("cdr/dual-user-inter/sport_cloth"))
    assert int(inter.shared.sum()) == 9828
    assert len(inter.get("sport", "train")) == 163291 and len(inter.get("cloth", "train")) == 187880
    assert len(np.unique(inter.get("sport", "train").users)) == 26346


# -- fast paths against their plain equivalents -------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.integers(0, 30), st.integers(0, 2**40)), min_size=1, max_size=40))
def test_id_map_equals_from_values(values):
    arr = np.array(values, dtype=np.int64)
    fast, codes = id_map(arr)
    ref, ref_codes = IdMap.from_values(arr)
    assert np.array_equal(fast.ids, ref.ids) and np.array_equal(codes, ref_codes)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.tuples(st.integers(0, 5), st.one_of(st.integers(-3, 3), st.integers(-2**62, 2**62))),
                     min_size=1, max_size=40))
def test_order_by_equals_lexsort(rows):
    p = np.array([r[0] for r in rows], dtype=np.int64)
    s = np.array([r[1] for r in rows], dtype=np.int64)
    assert np.array_equal(order_by(p, s), np.lexsort((np.arange(len(p)), s, p)))
    assert np.array_equal(order_by(p), np.lexsort((np.arange(len(p)), p)))
