"""Readers: interaction files -> :class:`Interactions` (original IDs kept, contiguous indices).

Every reader parses with a C parser (pandas / numpy) over the whole file; only when that fails does a
slow line scan run, to name the first malformed line (``file:line: reason``). Duplicate (user, item)
pairs are handled by an explicit policy (:func:`deduplicate`): keep the last by time by default, and the
number dropped is logged.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fishertune.recsys.data._sort import order_by
from fishertune.recsys.data.types import IdMap, Interactions
from fishertune.utils.progress import track

log = logging.getLogger("fishertune.data")

DuplicatePolicy = Literal["keep_last", "keep_first", "keep_all", "error"]
DUPLICATE_POLICIES = ("keep_last", "keep_first", "keep_all", "error")


class DataFormatError(ValueError):
    """A data file that cannot be read as asked; the message names the file (and line when known)."""


# ---------------------------------------------------------------------------------------------------
# helpers


def read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it ends in ``.gz``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataFormatError(f"{path}: not a valid gzip file ({exc})") from None
    return raw


def _line_text(path: Path, lineno: int) -> str:
    """Line ``lineno`` (1-based) of a file, for error messages only."""
    lines = read_bytes(path).decode("utf-8", errors="replace").splitlines()
    return lines[lineno - 1] if 0 < lineno <= len(lines) else ""


def _fail(path: Path, lineno: int, reason: str) -> DataFormatError:
    return DataFormatError(f"{path}:{lineno}: {reason}: {_line_text(path, lineno)!r}")


def _is_int(token: str) -> bool:
    try:
        int(token)
        return True
    except ValueError:
        return False


def _is_float(token: str) -> bool:
    try:
        float(token)
        return True
    except ValueError:
        return False


def _scan_for_bad_line(path: Path, sep: str | None, names: list[str], kinds: dict[str, str],
                       exact: bool = True) -> DataFormatError | None:
    """Slow path: the first line with a wrong field count or a non-numeric field (``kinds``: int/float)."""
    text = read_bytes(path).decode("utf-8", errors="replace")
    lines = text.splitlines()
    for lineno, line in track(enumerate(lines, 1), "checking lines", total=len(lines)):
        if not line.strip():
            continue
        parts = line.split() if sep is None else line.split(sep)
        if (exact and len(parts) != len(names)) or len(parts) < len(names):
            return _fail(path, lineno, f"expected {len(names)} fields separated by {sep or 'whitespace'!r}, "
                                       f"got {len(parts)}")
        for name, tok in zip(names, parts):
            check = {"int": _is_int, "float": _is_float}.get(kinds.get(name, ""))
            if check is not None and not check(tok.strip()):
                return _fail(path, lineno, f"field '{name}' is not a valid {kinds[name]} ({tok!r})")
    return None


def _to_ids(col: pd.Series) -> np.ndarray:
    """ID column as int64 when integral, else as strings (never a Python-object array)."""
    values = col.to_numpy()
    if np.issubdtype(values.dtype, np.integer):
        return values.astype(np.int64)
    if np.issubdtype(values.dtype, np.floating) and np.all(np.mod(values, 1) == 0):
        return values.astype(np.int64)
    return values.astype(str)


def id_map(values: np.ndarray) -> tuple[IdMap, np.ndarray]:
    """``IdMap.from_values`` with an O(n) path for small non-negative integer IDs (no sort)."""
    values = np.asarray(values)
    if values.dtype.kind in "iu" and len(values):
        lo, hi = int(values.min()), int(values.max())
        if lo >= 0 and hi < 4 * len(values) + 1024:
            present = np.bincount(values, minlength=hi + 1) > 0
            ids = np.flatnonzero(present).astype(values.dtype)
            code = np.cumsum(present) - 1
            return IdMap(ids), code[values].astype(np.int64)
    return IdMap.from_values(values)


def _build(users: np.ndarray, items: np.ndarray, ratings: np.ndarray | None, timestamps: np.ndarray | None,
           name: str) -> Interactions:
    user_ids, u = id_map(users)
    item_ids, i = id_map(items)
    return Interactions(u, i, user_ids, item_ids,
                        None if ratings is None else np.asarray(ratings, dtype=np.float32),
                        None if timestamps is None else np.asarray(timestamps, dtype=np.int64), name)


# ---------------------------------------------------------------------------------------------------
# duplicates


def deduplicate(inter: Interactions, policy: DuplicatePolicy = "keep_last") -> tuple[Interactions, int]:
    """Resolve repeated (user, item) pairs; return the result and the number of rows dropped.

    ``keep_last`` / ``keep_first``: keep the latest / earliest event of each pair by timestamp (file
    order when there are no timestamps, and to break ties); ``keep_all``: leave them (matrices then
    count a pair once); ``error``: raise, naming the first repeated pair. Kept rows stay in file order.
    """
    if policy not in DUPLICATE_POLICIES:
        raise ValueError(f"unknown duplicate policy {policy!r}; use one of {DUPLICATE_POLICIES}")
    n = len(inter)
    if policy == "keep_all" or n == 0:
        return inter, 0
    order = order_by(inter.users * np.int64(inter.n_items) + inter.items, inter.timestamps)
    u, i = inter.users[order], inter.items[order]
    same_as_next = np.zeros(n, dtype=bool)
    same_as_next[:-1] = (u[1:] == u[:-1]) & (i[1:] == i[:-1])
    n_dup = int(same_as_next.sum())
    if n_dup == 0:
        return inter, 0
    if policy == "error":
        first = order[np.flatnonzero(same_as_next)[0]]
        user = inter.user_ids.ids[inter.users[first]].item()
        item = inter.item_ids.ids[inter.items[first]].item()
        raise DataFormatError(
            f"{inter.name or 'data'}: {n_dup} duplicate (user, item) rows, e.g. user {user!r}, item {item!r}; "
            f"choose a duplicate policy (keep_last / keep_first / keep_all)")
    if policy == "keep_last":
        keep = ~same_as_next
    else:  # keep_first: drop every row that repeats the previous pair
        keep = np.ones(n, dtype=bool)
        keep[1:] = ~same_as_next[:-1]
    kept = np.sort(order[keep])
    log.warning("%s: dropped %d duplicate (user, item) rows (policy %s)", inter.name or "data", n_dup, policy)
    return inter.take(kept), n_dup


# ---------------------------------------------------------------------------------------------------
# delimited files without a header (MovieLens)


def _read_headerless(path: Path, sep: str, names: list[str], kinds: dict[str, str]) -> pd.DataFrame:
    """Parse a headerless delimited file with the C parser; bad lines are reported with their number."""
    raw = read_bytes(path)
    c_sep = sep
    if len(sep) > 1:  # the C parser takes one-character separators only
        raw = raw.replace(sep.encode(), b"\t")
        c_sep = "\t"
    try:
        frame = pd.read_csv(io.BytesIO(raw), sep=c_sep, header=None, names=names, engine="c",
                            skip_blank_lines=False)
    except (pd.errors.ParserError, ValueError) as exc:
        err = _scan_for_bad_line(path, sep, names, kinds)
        raise (err or DataFormatError(f"{path}: cannot parse ({exc})")) from None
    blank = frame.isna().all(axis=1).to_numpy()
    for name in names:
        col = frame[name]
        bad = col.isna().to_numpy() & ~blank
        kind = kinds.get(name)
        if kind and not pd.api.types.is_numeric_dtype(col):
            bad |= pd.to_numeric(col, errors="coerce").isna().to_numpy() & ~blank
        elif kind == "int" and pd.api.types.is_float_dtype(col):
            bad |= (np.mod(col.to_numpy(), 1) != 0) & ~col.isna().to_numpy()
        if bad.any():
            lineno = int(np.flatnonzero(bad)[0]) + 1
            raise _fail(path, lineno, f"missing or non-numeric field '{name}' (expected {len(names)} "
                                      f"fields separated by {sep!r})")
    if blank.any():
        frame = frame[~blank]
    return frame


def _frame_to_interactions(frame: pd.DataFrame, name: str) -> Interactions:
    return _build(frame["user"].to_numpy(np.int64), frame["item"].to_numpy(np.int64),
                  frame["rating"].to_numpy(np.float32), frame["timestamp"].to_numpy(np.int64), name)


_ML_NAMES = ["user", "item", "rating", "timestamp"]
_ML_KINDS = {"user": "int", "item": "int", "rating": "float", "timestamp": "int"}


def _locate(path: str | Path, candidates: tuple[str, ...]) -> Path:
    path = Path(path)
    if path.is_dir():
        for cand in candidates:
            if (path / cand).is_file():
                return path / cand
        raise FileNotFoundError(f"{path}: none of {', '.join(candidates)} found")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def read_movielens_100k(path: str | Path, duplicates: DuplicatePolicy = "keep_last") -> Interactions:
    """MovieLens 100K ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``); ``path``: file or folder."""
    file = _locate(path, ("u.data",))
    inter = _frame_to_interactions(_read_headerless(file, "\t", _ML_NAMES, _ML_KINDS), "ml-100k")
    return deduplicate(inter, duplicates)[0]


def read_movielens_1m(path: str | Path, duplicates: DuplicatePolicy = "keep_last") -> Interactions:
    """MovieLens 1M ``ratings.dat`` or ``ratings.dat.gz`` (``UserID::MovieID::Rating::Timestamp``)."""
    file = _locate(path, ("ratings.dat", "ratings.dat.gz"))
    inter = _frame_to_interactions(_read_headerless(file, "::", _ML_NAMES, _ML_KINDS), "ml-1m")
    return deduplicate(inter, duplicates)[0]


# ---------------------------------------------------------------------------------------------------
# generic files with a header


_DEFAULT_OPTIONAL = {"rating": "rating", "timestamp": "timestamp"}


def _table_format(path: Path, fmt: str | None) -> str:
    if fmt and fmt != "auto":
        return fmt
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    ext = suffixes[-1] if suffixes else ""
    if ext in (".parquet", ".pq"):
        return "parquet"
    if ext == ".csv":
        return "csv"
    if ext in (".tsv", ".tab", ".txt"):
        return "tsv"
    raise DataFormatError(f"{path}: cannot tell the format from the extension; give format csv/tsv/parquet")


def read_table(path: str | Path, *, user: str = "user", item: str = "item", rating: str | None = "rating",
               timestamp: str | None = "timestamp", format: str | None = None, sep: str | None = None,
               name: str | None = None, duplicates: DuplicatePolicy = "keep_last") -> Interactions:
    """A CSV / TSV / Parquet file with a header row (``.gz`` allowed for CSV/TSV).

    ``user`` and ``item`` name required columns. ``rating`` / ``timestamp`` name optional ones: a
    column left at its default name may be absent; one you named explicitly must exist; ``None``
    skips it. Timestamps may be numbers or date strings (converted to Unix seconds).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    fmt = _table_format(path, format)
    wanted = {"user": user, "item": item, "rating": rating, "timestamp": timestamp}
    if fmt == "parquet":
        import pyarrow.parquet as pq

        available = pq.read_schema(path).names
    else:
        if fmt not in ("csv", "tsv"):
            raise DataFormatError(f"{path}: unknown format {fmt!r}; use csv, tsv or parquet")
        c_sep = sep or ("," if fmt == "csv" else "\t")
        try:
            available = list(pd.read_csv(path, sep=c_sep, nrows=0).columns)
        except pd.errors.EmptyDataError:
            raise DataFormatError(f"{path}: empty file (a header row is expected)") from None
    cols: dict[str, str] = {}
    for role, col in wanted.items():
        if col is None:
            continue
        if col in available:
            cols[role] = col
        elif role in ("user", "item") or col != _DEFAULT_OPTIONAL.get(role):
            raise DataFormatError(f"{path}: no column {col!r} (the {role} column); columns are {available}")
    if fmt == "parquet":
        frame = pd.read_parquet(path, columns=list(cols.values()))
        row_label = "row"
        offset = 0
    else:
        try:
            # all columns (``usecols`` would hide rows with extra fields); ``index_col=False`` stops
            # pandas from silently turning a surplus first field into an index
            frame = pd.read_csv(path, sep=c_sep, engine="c", index_col=False, skip_blank_lines=False,
                                dtype={cols["user"]: str, cols["item"]: str})[list(cols.values())]
        except (pd.errors.ParserError, ValueError) as exc:
            hit = re.search(r"line (\d+), saw (\d+)", str(exc))
            if hit:
                raise _fail(path, int(hit.group(1)), f"expected {len(available)} fields, got {hit.group(2)}") from None
            raise DataFormatError(f"{path}: cannot parse ({exc})") from None
        row_label = "line"
        offset = 2  # header is line 1
    blank = frame.isna().all(axis=1).to_numpy() if fmt != "parquet" else np.zeros(len(frame), bool)

    def where(mask: np.ndarray) -> str:
        first = int(np.flatnonzero(mask)[0])
        return f"{path}:{first + offset}" if row_label == "line" else f"{path} (row {first})"

    out: dict[str, np.ndarray | None] = {"rating": None, "timestamp": None}
    for role, col in cols.items():
        series = frame[col]
        missing = series.isna().to_numpy() & ~blank
        if missing.any():
            raise DataFormatError(f"{where(missing)}: missing value in column {col!r} ({role})")
        series = series[~blank] if blank.any() else series
        if role in ("user", "item"):
            if fmt != "parquet":  # read as text: keep integral ids as integers
                as_int = pd.to_numeric(series, errors="coerce")
                if not as_int.isna().any() and np.all(np.mod(as_int.to_numpy(), 1) == 0):
                    series = as_int
            out[role] = _to_ids(series)
        elif role == "rating":
            num = pd.to_numeric(series, errors="coerce")
            if num.isna().any():
                bad = np.zeros(len(frame), bool)
                bad[np.flatnonzero(~blank)[num.isna().to_numpy()]] = True
                value = frame[col].to_numpy()[bad][0]
                raise DataFormatError(f"{where(bad)}: non-numeric rating {value!r} in column {col!r}")
            out["rating"] = num.to_numpy(np.float32)
        else:
            out["timestamp"] = _parse_timestamps(series, col, path, where, blank, frame)
    inter = _build(out["user"], out["item"], out["rating"], out["timestamp"], name or path.stem)
    return deduplicate(inter, duplicates)[0]


def _parse_timestamps(series: pd.Series, col: str, path: Path, where, blank: np.ndarray,
                      frame: pd.DataFrame) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(series):
        return (series.astype("datetime64[s]").astype(np.int64)).to_numpy()
    num = pd.to_numeric(series, errors="coerce")
    if not num.isna().any():
        return np.floor(num.to_numpy(np.float64)).astype(np.int64) if num.dtype.kind == "f" \
            else num.to_numpy(np.int64)
    dates = pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601")
    if dates.isna().any():  # not all ISO 8601: parse each value on its own (slower)
        dates = pd.to_datetime(series, errors="coerce", utc=True, format="mixed")
    if dates.isna().any():
        bad = np.zeros(len(frame), bool)
        bad[np.flatnonzero(~blank)[dates.isna().to_numpy()]] = True
        raise DataFormatError(f"{where(bad)}: timestamp {frame[col].to_numpy()[bad][0]!r} in column {col!r} "
                              f"is neither a number nor a date")
    return (dates.dt.tz_convert(None).astype("datetime64[s]").astype(np.int64)).to_numpy()


# ---------------------------------------------------------------------------------------------------
# sequential files: `user item1 item2 ...`


_WS = np.zeros(256, dtype=bool)
_WS[[9, 10, 11, 12, 13, 32]] = True


def _tokenise_lines(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """All whitespace-separated integer tokens of a file and the (0-based) line of each, vectorised."""
    raw = read_bytes(path)
    buf = np.frombuffer(raw, dtype=np.uint8)
    ws = _WS[buf]
    starts = np.flatnonzero(~ws & np.concatenate(([True], ws[:-1])))
    line = np.cumsum(buf == 10)[starts]  # newlines before each token start = its 0-based line
    try:
        values = np.array(raw.split()).astype(np.int64) if len(starts) else np.zeros(0, np.int64)
    except ValueError:
        lines = raw.decode("utf-8", errors="replace").splitlines()
        for lineno, text in track(enumerate(lines, 1), "checking lines", total=len(lines)):
            bad = [tok for tok in text.split() if not _is_int(tok)]
            if bad:
                raise _fail(path, lineno, f"non-integer id {bad[0]!r}") from None
        raise DataFormatError(f"{path}: non-integer token") from None
    return values, line.astype(np.int64)


def _split_lines(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per token after the first of each line: (head token of its line, token, position in line, line)."""
    values, line = _tokenise_lines(path)
    if len(values) == 0:
        raise DataFormatError(f"{path}: no data")
    is_head = np.concatenate(([True], line[1:] != line[:-1]))
    head_idx = np.flatnonzero(is_head)
    heads = values[head_idx]
    uniq, first, counts = np.unique(heads, return_index=True, return_counts=True)
    if np.any(counts > 1):
        dup = uniq[counts > 1][0]
        lines = line[head_idx][heads == dup][:2] + 1
        raise DataFormatError(f"{path}: user {dup} appears on lines {lines[0]} and {lines[1]}")
    group = np.cumsum(is_head) - 1
    pos = np.arange(len(values)) - head_idx[group] - 1
    body = ~is_head
    return heads[group][body], values[body], pos[body], line[body]


def read_sequences(path: str | Path, name: str | None = None,
                   duplicates: DuplicatePolicy = "keep_last") -> Interactions:
    """A sequential file, one line per user: ``user item1 item2 ...`` in time order.

    ``timestamps`` is the 0-based position in the user's sequence, so time-ordered protocols
    (leave-one-out) take the last item as test and the second to last as validation.
    """
    path = Path(path)
    users, items, pos, _ = _split_lines(path)
    inter = _build(users, items, None, pos, name or path.stem)
    return deduplicate(inter, duplicates)[0]


def read_negatives(path: str | Path) -> dict[int, np.ndarray]:
    """Sampled negatives (``LastFM_sample.txt``): ``user neg1 neg2 ...`` -> {user: original item ids}."""
    path = Path(path)
    users, items, _, _ = _split_lines(path)
    bounds = np.flatnonzero(np.concatenate(([True], users[1:] != users[:-1], [True])))
    return {int(users[a]): items[a:b] for a, b in zip(bounds[:-1], bounds[1:])}


def negatives_matrix(negatives: dict[int, np.ndarray], user_ids: IdMap, item_ids: IdMap) -> np.ndarray:
    """Negatives as an ``n_users x k`` index matrix (rows of users without negatives are -1).

    Every user must have the same number of negatives; unknown item IDs raise ``KeyError``.
    """
    lengths = {len(v) for v in negatives.values()}
    if len(lengths) != 1:
        raise DataFormatError(f"negatives have different lengths per user: {sorted(lengths)[:5]}")
    k = lengths.pop()
    out = np.full((len(user_ids), k), -1, dtype=np.int64)
    users = np.fromiter(negatives.keys(), dtype=np.int64, count=len(negatives))
    block = np.stack(list(negatives.values())) if negatives else np.zeros((0, k), np.int64)
    known = np.isin(users, user_ids.ids)
    out[user_ids.to_index(users[known])] = item_ids.to_index(block[known].ravel()).reshape(-1, k)
    return out


# ---------------------------------------------------------------------------------------------------
# cross-domain pairs


@dataclass
class CrossDomainData:
    """A pair of domains with shared users (DisenCDR / CDRIB folders ``a_b`` and ``b_a``).

    ``parts[domain][split]`` is an :class:`Interactions` per split file (``train``, ``valid``, ``test``,
    ``test_original``, as present), all with the one ``user_ids`` map and that domain's ``item_ids``.
    ``shared[u]`` is true for users that exist in both domains (all users in dual-user-intra).
    """

    scenario: str
    domains: tuple[str, str]
    user_ids: IdMap
    item_ids: dict[str, IdMap]
    parts: dict[str, dict[str, Interactions]]
    shared: np.ndarray

    def get(self, domain: str, split: str = "train") -> Interactions:
        if domain not in self.parts:
            raise KeyError(f"unknown domain {domain!r}; domains are {self.domains}")
        if split not in self.parts[domain]:
            raise KeyError(f"domain {domain!r} has no split {split!r}; it has {sorted(self.parts[domain])}")
        return self.parts[domain][split]

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"users": self.n_users, "shared_users": int(self.shared.sum())}
        for dom in self.domains:
            n = sum(len(p) for p in self.parts[dom].values())
            n_u = len(np.unique(np.concatenate([p.users for p in self.parts[dom].values()])))
            out[f"{dom}.users"] = n_u
            out[f"{dom}.items"] = len(self.item_ids[dom])
            out[f"{dom}.interactions"] = n
            out[f"{dom}.density"] = n / max(1, n_u * len(self.item_ids[dom]))
        return out


CDR_SPLITS = ("train", "valid", "test", "test_original")


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``user<TAB>item[<TAB>...]`` lines -> (users, items) as int64."""
    raw = read_bytes(path)
    first = raw.split(b"\n", 1)[0].split(b"\t")
    names = ["user", "item"] + [f"extra{k}" for k in range(max(0, len(first) - 2))]
    frame = _read_headerless(path, "\t", names, {n: "int" for n in names})
    return frame["user"].to_numpy(np.int64), frame["item"].to_numpy(np.int64)


def read_cross_domain(path: str | Path, n_shared_users: int | None = None,
                      duplicates: DuplicatePolicy = "keep_last") -> CrossDomainData:
    """Read a cross-domain pair from its folder ``.../<a>_<b>`` (the sibling ``<b>_<a>`` is read too).

    Files are ``user<TAB>item[<TAB>1]`` per split. In ``dual-user-intra`` every user exists in both
    domains with the same id. In ``dual-user-inter`` (CDRIB) only users ``0..n_shared-1`` are shared;
    higher ids are per domain. ``n_shared_users`` defaults to "all" when there is no ``valid.txt``
    and otherwise to one past the largest valid/test user (CDRIB numbers the shared users first and its
    cold-start valid/test users are shared ones); each valid/test user of one domain must have training
    data in the other, which is checked. Original user ids are the integers for shared users and
    ``"<domain>:<id>"`` strings for domain-only users (as strings throughout when some are not shared).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"cross-domain folder not found: {folder}")
    if folder.name.count("_") != 1:
        raise DataFormatError(f"{folder}: a cross-domain folder is named '<a>_<b>'")
    a, b = folder.name.split("_")
    sibling = folder.parent / f"{b}_{a}"
    if not sibling.is_dir():
        raise FileNotFoundError(f"{folder}: the other domain's folder {sibling} is missing")
    raw: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for dom, d in ((a, folder), (b, sibling)):
        raw[dom] = {s: _read_pairs(d / f"{s}.txt") for s in CDR_SPLITS if (d / f"{s}.txt").is_file()}
        if "train" not in raw[dom]:
            raise FileNotFoundError(f"{d}: no train.txt")
    inter_style = any("valid" in raw[d] for d in (a, b))
    if n_shared_users is None and inter_style:
        eval_users = [raw[d][s][0] for d in (a, b) for s in ("valid", "test") if s in raw[d]]
        n_shared_users = int(max(u.max() for u in eval_users)) + 1
        for dom, other in ((a, b), (b, a)):
            for s in ("valid", "test"):
                if s in raw[dom]:
                    missing = np.setdiff1d(raw[dom][s][0], raw[other]["train"][0])
                    if len(missing):
                        raise DataFormatError(
                            f"{folder.parent}: {s} user {missing[0]} of {dom} has no training data in {other}; "
                            f"cannot infer the shared users, pass n_shared_users")
    scenario = folder.parent.name
    if n_shared_users is None:  # every user is shared
        def to_orig(u: np.ndarray, dom: str) -> np.ndarray:
            return u
    else:
        def to_orig(u: np.ndarray, dom: str) -> np.ndarray:
            own = np.char.add(f"{dom}:", u.astype(str))
            return np.where(u < n_shared_users, u.astype(str), own)
    all_users = np.concatenate([to_orig(p[0], d) for d in (a, b) for p in raw[d].values()])
    user_ids, _ = IdMap.from_values(all_users)
    item_ids: dict[str, IdMap] = {}
    parts: dict[str, dict[str, Interactions]] = {}
    for dom in (a, b):
        item_ids[dom], _ = IdMap.from_values(np.concatenate([p[1] for p in raw[dom].values()]))
        parts[dom] = {}
        for s, (u, i) in raw[dom].items():
            inter = Interactions(user_ids.to_index(to_orig(u, dom)), item_ids[dom].to_index(i), user_ids,
                                 item_ids[dom], name=f"{scenario}/{dom}/{s}")
            parts[dom][s] = deduplicate(inter, duplicates)[0]
    if n_shared_users is None:
        shared = np.ones(len(user_ids), dtype=bool)
    else:
        shared = np.char.find(user_ids.ids.astype(str), ":") < 0
    return CrossDomainData(scenario, (a, b), user_ids, item_ids, parts, shared)
