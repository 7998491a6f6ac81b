"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019).

EASE learns an item-item matrix ``B`` minimising ``||X - X B||_F^2 + lambda ||B||_F^2`` subject to
``diag(B) = 0``. The closed form is ``P = (X^T X + lambda I)^-1``, ``B = I - P diag(1/diag(P))``,
i.e. ``B_ij = -P_ij / P_jj`` off the diagonal and 0 on it. Scores are ``history @ B``.

Cost: the Gram matrix ``X^T X`` from the sparse matrix (scipy), then one symmetric positive definite
inverse in float64: on CPU through LAPACK ``potrf`` + ``potri`` (scipy's OpenBLAS, faster here than
torch's MKL inverse on AMD CPUs), on a GPU through ``torch.linalg.cholesky`` + ``cholesky_inverse``.
Memory: a few dense ``n_items x n_items`` float64 matrices.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import scipy.linalg as sla
import scipy.sparse as sp
import torch
from pydantic import Field
from torch import Tensor

from fishertune.config import StrictModel
from fishertune.recsys.models.base import Recommender, register_model


class EASEConfig(StrictModel):
    name: Literal["ease"] = "ease"
    lambda_: float = Field(500.0, gt=0, description="L2 penalty; ~500 suits ML-1M-sized data")


def gram_matrix(train: sp.spmatrix) -> np.ndarray:
    """Dense float64 ``X^T X`` of the binarised ``train``."""
    x = sp.csr_matrix(train, dtype=np.float64, copy=True)
    x.sum_duplicates()
    x.eliminate_zeros()
    x.data[:] = 1.0
    return (x.T.tocsr() @ x).toarray()


def ease_from_gram(gram: np.ndarray, lambda_: float, backend: str = "scipy",
                   device: torch.device | str = "cpu") -> Tensor:
    """``B`` (float32 tensor on ``device``) from the Gram matrix; ``backend``: "scipy" (CPU LAPACK) or
    "torch" (``device``, e.g. CUDA). ``gram`` is modified in place by the scipy backend."""
    n = gram.shape[0]
    if gram.shape != (n, n):
        raise ValueError(f"gram matrix must be square, got {gram.shape}")
    if backend == "scipy":
        a = np.asarray(gram, dtype=np.float64)
        a[np.diag_indices(n)] += lambda_
        chol, info = sla.lapack.dpotrf(a, lower=1, overwrite_a=1, clean=0)
        if info != 0:
            raise np.linalg.LinAlgError(_not_pd(lambda_, info))
        p, info = sla.lapack.dpotri(chol, lower=1, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(_not_pd(lambda_, info))
        p = np.tril(p)
        p += np.tril(p, -1).T  # potri fills the lower triangle only
        p /= -np.diag(p)[None, :]
        np.fill_diagonal(p, 0.0)
        return torch.from_numpy(p.astype(np.float32)).to(device)
    if backend == "torch":
        a = torch.as_tensor(gram, dtype=torch.float64, device=device)
        a.diagonal().add_(lambda_)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) != 0:
            raise np.linalg.LinAlgError(_not_pd(lambda_, int(info)))
        p = torch.cholesky_inverse(chol)
        p = p / (-p.diagonal()).unsqueeze(0)
        p.fill_diagonal_(0.0)
        return p.float()
    raise ValueError(f"unknown backend {backend!r}; use 'scipy' or 'torch'")


def _not_pd(lambda_: float, info: int) -> str:
    return (f"EASE: X^T X + lambda I is not positive definite (leading minor {info}); lambda_={lambda_} "
            "must be > 0 and large enough for the data's scale")


@register_model("ease")
class EASE(Recommender):
    """Closed-form item-item linear autoencoder; ``B`` is a buffer, so it is saved in checkpoints."""

    config_class = EASEConfig

    def __init__(self, cfg: EASEConfig, n_users: int, n_items: int) -> None:
        super().__init__(cfg, n_users, n_items)
        self.register_buffer("B", torch.zeros(n_items, n_items))

    def fit(self, train: sp.csr_matrix) -> None:
        if train.shape[1] != self.n_items:
            raise ValueError(f"EASE.fit: train has {train.shape[1]} items, the model {self.n_items}")
        device = self.B.device
        backend = "scipy" if device.type == "cpu" else "torch"
        self.B.copy_(ease_from_gram(gram_matrix(train), self.cfg.lambda_, backend=backend, device=device))

    def score(self, users: Tensor, history: Tensor) -> Tensor:
        self._check_history(history)
        return history.to(self.B.dtype) @ self.B
