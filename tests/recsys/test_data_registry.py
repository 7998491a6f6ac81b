"""Registry: name resolution, user datasets, and the download path (local file:// archives only)."""

from __future__ import annotations

import dataclasses
import hashlib
import zipfile
from pathlib import Path

import pytest

from fishertune.recsys.data import (ChecksumError, ensure_dataset, get_dataset, list_datasets, load_dataset,
                                    register_file, verify_dataset)

U_DATA = "1\t10\t5\t100\n2\t10\t3\t101\n2\t11\t4\t102\n"


@pytest.fixture
def roots(tmp_path, monkeypatch):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    monkeypatch.setenv("FISHERTUNE_DATA", str(data))
    monkeypatch.setenv("FISHERTUNE_CACHE", str(cache))
    return data, cache


def make_zip(path: Path, files: dict[str, str]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path.as_uri()


def ml100k_spec(url: str, u_data: str = U_DATA, archive_sha256: str | None = None):
    digest = hashlib.sha256(u_data.encode()).hexdigest()
    return dataclasses.replace(get_dataset("ml-100k"), url=url, archive_sha256=archive_sha256,
                               checksums={"u.data": ("sha256", digest)})


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_download_verify_extract(roots, tmp_path):
    data, _ = roots
    url = make_zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": U_DATA, "ml-100k/README": "hi",
                                              "other/ignored.txt": "x"})
    spec = ml100k_spec(url)
    files = ensure_dataset(spec)
    assert files == [data / "ml-100k" / "u.data"]
    assert leftovers(data) == ["ml-100k", "ml-100k/README", "ml-100k/u.data"]  # only the inner folder
    inter = spec.loader(files, "keep_last")
    assert (inter.n_users, inter.n_items, len(inter)) == (2, 2, 3)
    assert ensure_dataset(spec) == files  # present: no second download


def test_download_archive_sha256(roots, tmp_path):
    data, _ = roots
    zpath = tmp_path / "a.zip"
    url = make_zip(zpath, {"ml-100k/u.data": U_DATA})
    good = hashlib.sha256(zpath.read_bytes()).hexdigest()
    assert ensure_dataset(ml100k_spec(url, archive_sha256=good))
    bad_root = tmp_path / "data2"
    with pytest.raises(ChecksumError, match="sha256 of .* expected 0000"):
        ensure_dataset(ml100k_spec(url, archive_sha256="0" * 64), root=bad_root)
    assert leftovers(bad_root) == []


def test_checksum_mismatch_leaves_nothing(roots, tmp_path):
    data, _ = roots
    url = make_zip(tmp_path / "ml-100k.zip", {"ml-100k/u.data": U_DATA + "3\t12\t1\t103\n"})
    with pytest.raises(ChecksumError, match="sha256 of u.data is .*nothing was installed"):
        ensure_dataset(ml100k_spec(url))
    assert leftovers(data) == []


def test_partial_folder_is_completed(roots, tmp_path):
    data, _ = roots
    (data / "ml-100k").mkdir()
    (data / "ml-100k" / "mine.txt").write_text("keep me")
    url = make_zip(tmp_path / "z.zip", {"ml-100k/u.data": U_DATA})
    ensure_dataset(ml100k_spec(url))
    assert leftovers(data) == ["ml-100k", "ml-100k/mine.txt", "ml-100k/u.data"]


def test_unsafe_archive_rejected(roots, tmp_path):
    data, _ = roots
    url = make_zip(tmp_path / "evil.zip", {"../escape.txt": "x", "ml-100k/u.data": U_DATA})
    spec = dataclasses.replace(ml100k_spec(url), archive_folder="")
    with pytest.raises(ChecksumError, match="unsafe member"):
        ensure_dataset(spec)
    assert leftovers(data) == [] and not (tmp_path / "escape.txt").exists()


def test_missing_without_url_or_download(roots):
    with pytest.raises(FileNotFoundError, match="Beauty.txt not found.*FISHERTUNE_DATA"):
        load_dataset("beauty")
    with pytest.raises(FileNotFoundError, match="can be downloaded from https://files.grouplens.org"):
        ensure_dataset("ml-1m", download=False)


def test_names_and_user_registration(roots, tmp_path):
    assert {"ml-100k", "ml-1m", "beauty", "sports", "lastfm"} <= set(list_datasets())
    with pytest.raises(KeyError, match="unknown dataset 'ml-10m'"):
        get_dataset("ml-10m")
    f = tmp_path / "clicks.csv"
    f.write_text("uid,iid\n1,a\n1,b\n2,a\n")
    register_file("test-clicks", f, user="uid", item="iid", overwrite=True)
    inter = load_dataset("test-clicks")
    assert (inter.n_users, inter.n_items, len(inter)) == (2, 2, 3) and inter.name == "test-clicks"
    with pytest.raises(ValueError, match="already registered"):
        register_file("test-clicks", f)


def test_real_checksums(data_root):
    data_root("ml-100k")
    data_root("ml-1m")
    assert verify_dataset("ml-100k") == {"u.data": True}
    assert verify_dataset("ml-1m") == {"ratings.dat": True}  # md5 of the gunzipped shared copy
    inter = load_dataset("cdr/dual-user-intra/sport_cloth")
    assert inter.n_users == 9928 and inter.name == "dual-user-intra/sport"
