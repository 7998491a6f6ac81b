"""Text data sets under ``$FISHERTUNE_DATA/text`` (offline): the STS Benchmark (sentence-pair similarity,
scores 0-5) and SST-2 (binary sentiment), plus the STS-B metric (Spearman of cosine similarities).

Files are read as plain tab-separated lines without quote handling (sentences contain quote
characters); a malformed line raises a ``ValueError`` naming the file and line number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fishertune.utils.settings import data_root

STSB_SPLITS = ("train", "dev", "test")
SST2_SPLITS = ("train", "dev")


@dataclass(frozen=True)
class SentencePairs:
    """STS-B pairs: ``sentence1[i]``, ``sentence2[i]`` with gold similarity ``scores[i]`` in [0, 5];
    ``genres`` is the first column (``main-captions``, ``main-news``, ``main-forums``)."""

    sentence1: list[str]
    sentence2: list[str]
    scores: np.ndarray
    genres: list[str]

    def __len__(self) -> int:
        return len(self.scores)

    def subset(self, index: Sequence[int] | np.ndarray) -> "SentencePairs":
        idx = np.asarray(index, dtype=np.int64)
        return SentencePairs([self.sentence1[i] for i in idx], [self.sentence2[i] for i in idx],
                             self.scores[idx], [self.genres[i] for i in idx])


@dataclass(frozen=True)
class LabelledSentences:
    """SST-2 sentences with labels 0 (negative) / 1 (positive)."""

    sentences: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int] | np.ndarray) -> "LabelledSentences":
        idx = np.asarray(index, dtype=np.int64)
        return LabelledSentences([self.sentences[i] for i in idx], self.labels[idx])


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; put the text datasets under FISHERTUNE_DATA "
                                f"(now {data_root()})")
    with open(path, encoding="utf-8", newline="") as fh:
        text = fh.read()
    return text.split("\n")


def read_stsb_file(path: str | Path) -> SentencePairs:
    """One STS-B csv file: tab separated ``genre file year id score sentence1 sentence2`` (7 columns, or 9
    where two trailing source columns follow: ignored); no header, no quoting."""
    path = Path(path)
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    genres: list[str] = []
    for no, line in enumerate(_lines(path), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) not in (7, 9):
            raise ValueError(f"{path}:{no}: {len(cols)} tab-separated columns, expected 7 "
                             f"(genre file year id score sentence1 sentence2) or 9 (two extra trailing columns)")
        try:
            score = float(cols[4])
        except ValueError:
            raise ValueError(f"{path}:{no}: score {cols[4]!r} is not a number") from None
        if not 0.0 <= score <= 5.0:
            raise ValueError(f"{path}:{no}: score {score} outside [0, 5]")
        if not cols[5].strip() or not cols[6].strip():
            raise ValueError(f"{path}:{no}: empty sentence")
        genres.append(cols[0])
        scores.append(score)
        s1.append(cols[5])
        s2.append(cols[6])
    if not scores:
        raise ValueError(f"{path}: no sentence pairs")
    return SentencePairs(s1, s2, np.asarray(scores, dtype=np.float64), genres)


def load_stsb(split: str = "test", root: str | Path | None = None) -> SentencePairs:
    """STS-B ``train`` (5,749 pairs), ``dev`` (1,500) or ``test`` (1,379) from
    ``$FISHERTUNE_DATA/text/sts-b/{split}.csv`` (or ``root/{split}.csv``)."""
    if split not in STSB_SPLITS:
        raise ValueError(f"unknown STS-B split {split!r}; choose from {STSB_SPLITS}")
    folder = Path(root) if root is not None else data_root() / "text" / "sts-b"
    return read_stsb_file(folder / f"{split}.csv")


def read_sst2_file(path: str | Path) -> LabelledSentences:
    """One SST-2 tsv file with the header ``text<TAB>label``; labels must be 0 or 1."""
    path = Path(path)
    lines = _lines(path)
    if not lines or lines[0].rstrip("\r").split("\t") != ["text", "label"]:
        raise ValueError(f"{path}:1: header must be 'text<TAB>label', got {lines[0][:60]!r}" if lines
                         else f"{path}: empty file")
    sentences: list[str] = []
    labels: list[int] = []
    for no, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 2:
            raise ValueError(f"{path}:{no}: {len(cols)} tab-separated columns, expected 2 (text, label)")
        if cols[1] not in ("0", "1"):
            raise ValueError(f"{path}:{no}: label {cols[1]!r} is not 0 or 1")
        if not cols[0].strip():
            raise ValueError(f"{path}:{no}: empty sentence")
        sentences.append(cols[0].strip())
        labels.append(int(cols[1]))
    if not labels:
        raise ValueError(f"{path}: no sentences")
    return LabelledSentences(sentences, np.asarray(labels, dtype=np.int64))


def load_sst2(split: str = "dev", root: str | Path | None = None) -> LabelledSentences:
    """SST-2 ``train`` (67,349 sentences) or ``dev`` (872) from ``$FISHERTUNE_DATA/text/sst-2/{split}.tsv``
    (GLUE's test labels are not public)."""
    if split not in SST2_SPLITS:
        raise ValueError(f"unknown SST-2 split {split!r}; choose from {SST2_SPLITS}")
    folder = Path(root) if root is not None else data_root() / "text" / "sst-2"
    return read_sst2_file(folder / f"{split}.tsv")


def spearman(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation (ties get average ranks), as a fraction in [-1, 1]."""
    from scipy.stats import spearmanr

    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size < 2:
        raise ValueError(f"spearman needs two equal-length vectors of >= 2 values, got {x.shape} and {y.shape}")
    return float(spearmanr(x, y).statistic)


def stsb_spearman(encode: Callable[[list[str]], torch.Tensor], pairs: SentencePairs) -> float:
    """STS-B metric: Spearman between the gold scores and the cosine similarity of the two sentences'
    embeddings; ``encode(sentences) -> (N, d)`` (e.g. ``MiniLM.encode``). Each distinct sentence is
    encoded once."""
    unique = sorted(set(pairs.sentence1) | set(pairs.sentence2))
    pos = {s: i for i, s in enumerate(unique)}
    emb = torch.nn.functional.normalize(torch.as_tensor(encode(unique)).float(), dim=1)
    a = emb[[pos[s] for s in pairs.sentence1]]
    b = emb[[pos[s] for s in pairs.sentence2]]
    return spearman((a * b).sum(1).numpy(), pairs.scores)
