"""``nn.MultiheadAttention`` by hooks: while the engine runs, the module's forward is replaced by an
equivalent decomposed computation whose projections ``q = query Wq^T + bq`` (k, v likewise) and
``out = ctx Wo^T + bo`` are tapped; each tap is a Linear layer for the per-sample rule (rows of the
fused ``in_proj_weight`` per block). Exact, no re-forward, works with dropout in train mode (the same
mask serves the forward and the gradients) and in token-level mode (per-position contributions).

Not covered (those modules use the torch.func path): ``add_bias_kv``, ``add_zero_attn``, unbatched
(2-D) inputs, a module called more than once per forward.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishertune.fisher.hooks import Rule, RuleError

# tap(weight name, weight rows, bias name, bias rows, layer input, layer output) -> output to use
Tap = Callable[[str, slice | None, str | None, slice | None, Tensor, Tensor], Tensor]


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class AttentionRule(Rule):
    kind = "attention"
    positional = True
    patches_forward = True
    multi_call_ok = False
    checks_lead = False  # batch_first=False puts the samples in dimension 1

    def params(self, module: nn.MultiheadAttention) -> list[str]:
        names = [n for n in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias")
                 if getattr(module, n, None) is not None]
        names.append("out_proj.weight")
        if module.out_proj.bias is not None:
            names.append("out_proj.bias")
        return names

    def unsupported(self, module):
        if module.bias_k is not None or module.bias_v is not None:
            return "add_bias_kv"
        if module.add_zero_attn:
            return "add_zero_attn"
        return None

    def forward(self, m: nn.MultiheadAttention, tap: Tap, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if query.dim() != 3:
            raise RuleError("unbatched (2-D) attention inputs are not supported")
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, L, E = query.shape
        S = key.shape[1]
        H, hd = m.num_heads, m.head_dim
        bias = m.in_proj_bias
        if m._qkv_same_embed_dim:
            w = m.in_proj_weight
            wq, wk, wv = w[:E], w[E:2 * E], w[2 * E:]
            names = ("in_proj_weight",) * 3
        else:
            wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
            names = ("q_proj_weight", "k_proj_weight", "v_proj_weight")
        rows = (slice(0, E), slice(E, 2 * E), slice(2 * E, 3 * E))
        proj = []
        for x, wt, name, r in zip((query, key, value), (wq, wk, wv), names, rows):
            b = bias[r] if bias is not None else None
            y = F.linear(x, wt, b)
            proj.append(tap(name, r if m._qkv_same_embed_dim else None,
                            "in_proj_bias" if bias is not None else None, r, x, y))
        q, k, v = (t.reshape(B, -1, H, hd).transpose(1, 2) for t in proj)
        mask = _float_mask(attn_mask, q.dtype)
        if mask is not None:
            if mask.dim() == 2:
                mask = mask.reshape(1, 1, L, S)
            elif mask.dim() == 3:
                mask = mask.reshape(B, H, L, S)
        kpm = _float_mask(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.reshape(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        p_drop = m.dropout if m.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)) * (hd ** -0.5)
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            attn = F.dropout(weights, p_drop) if p_drop > 0 else weights
            ctx = attn @ v
        else:
            weights = None
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        ctx = ctx.transpose(1, 2).reshape(B, L, E)
        out = F.linear(ctx, m.out_proj.weight, m.out_proj.bias)
        out = tap("out_proj.weight", None, "out_proj.bias" if m.out_proj.bias is not None else None, None, ctx, out)
        if not m.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights
