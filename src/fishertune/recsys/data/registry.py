"""Dataset registry: a name -> files under ``data_root()``, a reader, and where to download them.

Built in: ``ml-100k``, ``ml-1m`` (downloaded from files.grouplens.org when missing), ``beauty``,
``sports``, ``lastfm`` (S3-Rec sequences) and every ``cdr/<scenario>/<a>_<b>`` pair folder. A download
is verified by sha256 (of the archive when known, else of the extracted key files), extracted into a
temporary folder beside the target and moved into place only when every check passed, under a lock,
so a failed or concurrent download never leaves partial files. Users add their own files with
:func:`register_file` (or any reader with :func:`register_dataset`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Mapping

import numpy as np

from fishertune.recsys.data.readers import (CDR_SPLITS, CrossDomainData, DuplicatePolicy, deduplicate,
                                            read_bytes, read_cross_domain, read_movielens_1m,
                                            read_movielens_100k, read_sequences, read_table)
from fishertune.recsys.data.types import Interactions
from fishertune.utils.io import atomic_dir, file_lock
from fishertune.utils.progress import track
from fishertune.utils.settings import cache_root, data_root

Loader = Callable[[list[Path], DuplicatePolicy], Interactions]


class ChecksumError(RuntimeError):
    """A downloaded archive or extracted file does not match its recorded digest."""


@dataclass(frozen=True, eq=False)
class DatasetSpec:
    """How to find, read and (optionally) download one dataset.

    ``files`` are paths relative to ``folder`` (itself relative to ``data_root()`` unless absolute);
    ``"a|b"`` accepts either. ``loader`` gets the located files. ``checksums`` map a file to
    ``(algorithm, hexdigest)`` of its uncompressed content; ``archive_folder`` is the folder inside the
    archive that holds the files.
    """

    name: str
    folder: str
    files: tuple[str, ...]
    loader: Loader
    url: str | None = None
    archive_sha256: str | None = None
    checksums: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    archive_folder: str = ""
    description: str = ""

    def path(self, root: Path | None = None) -> Path:
        folder = Path(self.folder).expanduser()
        return folder if folder.is_absolute() else (root or data_root()) / folder

    def locate(self, root: Path | None = None) -> tuple[list[Path], list[str]]:
        """(found files, missing entries) under this dataset's folder."""
        base = self.path(root)
        found, missing = [], []
        for entry in self.files:
            hit = next((base / alt for alt in entry.split("|") if (base / alt).is_file()), None)
            (found.append(hit) if hit is not None else missing.append(entry))
        return found, missing


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Add a dataset under ``spec.name`` (an existing name is an error unless ``overwrite``)."""
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[spec.name] = spec
    return spec


def register_file(name: str, path: str | os.PathLike, *, format: str = "auto", sep: str | None = None,
                  user: str = "user", item: str = "item", rating: str | None = "rating",
                  timestamp: str | None = "timestamp", overwrite: bool = False) -> DatasetSpec:
    """Register a generic interaction file (csv / tsv / parquet with a header, or ``sequence``).

    ``path`` is absolute, or relative to ``data_root()``; column names as in :func:`read_table`.
    """
    path = Path(path)

    def loader(paths: list[Path], duplicates: DuplicatePolicy) -> Interactions:
        if format == "sequence":
            return read_sequences(paths[0], name=name, duplicates=duplicates)
        return read_table(paths[0], user=user, item=item, rating=rating, timestamp=timestamp,
                          format=format, sep=sep, name=name, duplicates=duplicates)

    return register_dataset(DatasetSpec(name, str(path.parent), (path.name,), loader,
                                        description=f"user file {path}"), overwrite=overwrite)


def _movielens(reader: Callable[..., Interactions]) -> Loader:
    return lambda paths, duplicates: reader(paths[0], duplicates=duplicates)


def _sequence(name: str) -> Loader:
    return lambda paths, duplicates: read_sequences(paths[0], name=name, duplicates=duplicates)


GROUPLENS = "https://files.grouplens.org/datasets/movielens"

register_dataset(DatasetSpec(
    "ml-100k", "ml-100k", ("u.data",), _movielens(read_movielens_100k), url=f"{GROUPLENS}/ml-100k.zip",
    checksums={"u.data": ("sha256", "06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490")},
    archive_folder="ml-100k", description="MovieLens 100K: 943 users, 1,682 items, 100,000 ratings"))
register_dataset(DatasetSpec(
    "ml-1m", "ml-1m", ("ratings.dat|ratings.dat.gz",), _movielens(read_movielens_1m),
    url=f"{GROUPLENS}/ml-1m.zip",
    checksums={"ratings.dat": ("md5", "a89aa3591bc97d6d4e0c89459ff39362")},
    archive_folder="ml-1m", description="MovieLens 1M: 6,040 users, 3,706 items, 1,000,209 ratings"))
for _name, _file, _sha in (
        ("beauty", "Beauty.txt", "226cce9c3105299ca0db9615d7d3fb32b3175e90da43100ae352599f0f0107b8"),
        ("sports", "Sports_and_Outdoors.txt", "2a095e0648872beb9982408958290f5d655db5be2911c3756b5446de9f0b8de2"),
        ("lastfm", "LastFM.txt", "9ded486adb5b0fe9dc761950afa0a9a05e93ff018992e0c52bf11afec529f802")):
    register_dataset(DatasetSpec(_name, "seq", (_file,), _sequence(_name), checksums={_file: ("sha256", _sha)},
                                 description=f"S3-Rec sequences seq/{_file} (no download: place the file)"))
NEGATIVES = {"lastfm": "seq/LastFM_sample.txt"}  # sampled-protocol negatives, relative to data_root()


def _cdr_spec(name: str) -> DatasetSpec:
    """``cdr/<scenario>/<a>_<b>``: domain a of a cross-domain pair, all of its split files together."""
    parts = name.split("/")
    if len(parts) != 3 or parts[2].count("_") != 1:
        raise KeyError(f"cross-domain names look like 'cdr/dual-user-intra/sport_cloth', got {name!r}")
    a, b = parts[2].split("_")
    here, there = data_root() / name, data_root() / parts[0] / parts[1] / f"{b}_{a}"
    splits = [s for s in CDR_SPLITS if (here / f"{s}.txt").is_file()] or ["train"]
    files = tuple(f"{s}.txt" for s in splits) + tuple(
        f"../{b}_{a}/{s}.txt" for s in CDR_SPLITS if (there / f"{s}.txt").is_file())

    def loader(paths: list[Path], duplicates: DuplicatePolicy) -> Interactions:
        return cdr_domain_interactions(read_cross_domain(paths[0].parent, duplicates=duplicates), a, duplicates)

    return DatasetSpec(name, name, files, loader, description=f"domain {a} of the {parts[1]} pair {a}/{b}")


def cdr_domain_interactions(data: CrossDomainData, domain: str,
                            duplicates: DuplicatePolicy = "keep_last") -> Interactions:
    """All split files of one domain as one log (for the single-domain protocols), deduplicated.

    ``test.txt`` is skipped when ``test_original.txt`` is there (DisenCDR's test is a subset of it)."""
    split_parts = data.parts[domain]
    parts = [p for s, p in split_parts.items() if not (s == "test" and "test_original" in split_parts)]
    inter = Interactions(np.concatenate([p.users for p in parts]), np.concatenate([p.items for p in parts]),
                         data.user_ids, data.item_ids[domain], name=f"{data.scenario}/{domain}")
    return deduplicate(inter, "keep_last" if duplicates == "keep_all" else duplicates)[0]


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a registered dataset; ``cdr/...`` names resolve to any pair folder."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("cdr/"):
        return _cdr_spec(name)
    raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(list_datasets())} "
                   "(or cdr/<scenario>/<a>_<b>, or give DataConfig.path)")


def list_datasets() -> list[str]:
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------------------------------------
# checksums, download, extraction


def file_checksum(path: Path, algorithm: str = "sha256") -> str:
    """Digest of a file's (uncompressed, for ``.gz``) content."""
    if Path(path).suffix == ".gz":
        return hashlib.new(algorithm, read_bytes(path)).hexdigest()
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_files(spec: DatasetSpec, folder: Path) -> None:
    for rel, (algo, expected) in spec.checksums.items():
        cands = [folder / rel, folder / (rel + ".gz")]
        path = next((p for p in cands if p.is_file()), None)
        if path is None:
            raise ChecksumError(f"dataset {spec.name}: {rel} missing from the archive")
        got = file_checksum(path, algo)
        if got != expected:
            raise ChecksumError(f"dataset {spec.name}: {algo} of {rel} is {got}, expected {expected}; the "
                                "download is corrupt or not the official file (nothing was installed)")


def verify_dataset(name: str, root: Path | None = None) -> dict[str, bool]:
    """Check the present files of a dataset against its recorded checksums: {file: matches}."""
    spec = get_dataset(name)
    folder = spec.path(root)
    out = {}
    for rel, (algo, expected) in spec.checksums.items():
        path = next((p for p in (folder / rel, folder / (rel + ".gz")) if p.is_file()), None)
        if path is not None:
            out[rel] = file_checksum(path, algo) == expected
    return out


def _fetch(url: str, dest: Path) -> str:
    """Stream ``url`` (http(s) or file://) to ``dest``; return its sha256."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as resp, open(dest, "wb") as out:
        size = resp.headers.get("Content-Length")
        chunk = 1 << 20
        total = -(-int(size) // chunk) if size else None
        for block in track(iter(lambda: resp.read(chunk), b""), f"downloading {url.rsplit('/', 1)[-1]}",
                           total=total):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def _extract(archive: Path, dest: Path, inner: str) -> None:
    """Extract the members under ``inner/`` of a zip into ``dest`` (refusing paths that escape it)."""
    prefix = PurePosixPath(inner) if inner else None
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.infolist() if not m.is_dir()]
        for member in track(members, f"extracting {archive.name}"):
            rel = PurePosixPath(member.filename)
            if rel.is_absolute() or ".." in rel.parts:
                raise ChecksumError(f"{archive}: unsafe member path {member.filename!r}")
            if prefix is not None:
                if rel.parts[:len(prefix.parts)] != prefix.parts:
                    continue
                rel = PurePosixPath(*rel.parts[len(prefix.parts):])
            target = dest / Path(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


def ensure_dataset(name: str | DatasetSpec, root: Path | None = None, download: bool = True) -> list[Path]:
    """The dataset's key files, downloading and installing them first when missing (and allowed)."""
    spec = name if isinstance(name, DatasetSpec) else get_dataset(name)
    found, missing = spec.locate(root)
    if not missing:
        return found
    folder = spec.path(root)
    if spec.url is None or not download:
        hint = f"; it can be downloaded from {spec.url}" if spec.url else ""
        raise FileNotFoundError(f"dataset {spec.name}: {', '.join(missing)} not found in {folder} "
                                f"(set FISHERTUNE_DATA to the folder holding it{hint})")
    lock_name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]
    with file_lock(cache_root() / "locks" / f"download-{lock_name}"):
        found, missing = spec.locate(root)
        if not missing:
            return found
        folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{folder.name}.download-", dir=folder.parent) as tmp:
            archive = Path(tmp) / "archive.zip"
            digest = _fetch(spec.url, archive)
            if spec.archive_sha256 and digest != spec.archive_sha256:
                raise ChecksumError(f"dataset {spec.name}: sha256 of {spec.url} is {digest}, expected "
                                    f"{spec.archive_sha256} (nothing was installed)")
            if not folder.exists():
                with atomic_dir(folder) as staging:
                    _extract(archive, staging, spec.archive_folder)
                    _check_files(spec, staging)
            else:  # a partial folder the user already has: verify, then move files in one by one
                staging = Path(tmp) / "extract"
                _extract(archive, staging, spec.archive_folder)
                _check_files(spec, staging)
                for src in sorted(p for p in staging.rglob("*") if p.is_file()):
                    dst = folder / src.relative_to(staging)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(src, dst)
    found, missing = spec.locate(root)
    if missing:
        raise FileNotFoundError(f"dataset {spec.name}: the archive from {spec.url} has no {', '.join(missing)}")
    return found


def load_dataset(name: str, duplicates: DuplicatePolicy = "keep_last", download: bool = True) -> Interactions:
    """Read a registered dataset (downloading it first when missing and possible)."""
    spec = get_dataset(name)
    return spec.loader(ensure_dataset(spec, download=download), duplicates)


def load_cross_domain(name: str, n_shared_users: int | None = None) -> CrossDomainData:
    """Read a ``cdr/<scenario>/<a>_<b>`` pair with both domains."""
    if not name.startswith("cdr/"):
        raise KeyError(f"{name!r} is not a cross-domain dataset (cdr/<scenario>/<a>_<b>)")
    return read_cross_domain(data_root() / name, n_shared_users=n_shared_users)


def load_negatives(name: str) -> dict[int, np.ndarray]:
    """Sampled negatives of a dataset that ships them (``lastfm``): {original user: original item ids}."""
    from fishertune.recsys.data.readers import read_negatives

    if name not in NEGATIVES:
        raise KeyError(f"dataset {name!r} has no sampled negatives (those with: {sorted(NEGATIVES)})")
    return read_negatives(data_root() / NEGATIVES[name])
