"""Multi-head attention whose projections are modules, so that they can be factorized.

``nn.MultiheadAttention`` keeps its packed q/k/v projection as a raw ``in_proj_weight`` tensor
and reads ``out_proj.weight`` directly inside ``F.multi_head_attention_forward``: neither
projection is ever *called*, so a factorized replacement would be bypassed. This module computes
the same function (Vaswani et al. 2017; PyTorch's semantics for masks, dropout and the returned
weights) with ``in_proj`` (E → 3E) and ``out_proj`` (E → E) as ordinary child modules, which
factorize_ then treats like any Linear: the packed q/k/v projection becomes one low-rank matrix
with one input basis shared by q, k and v, as timm's fused ``qkv`` layers do.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectedMultiheadAttention(nn.Module):
    """Drop-in for a self-attention ``nn.MultiheadAttention`` (packed projections, no bias_k/v,
    no add_zero_attn). Build it with :meth:`from_mha`; the forward has the same signature and
    returns ``(output, weights or None)``."""

    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, batch_first: bool = False,
                 bias: bool = True, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = float(dropout), bool(batch_first)
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias, device=device, dtype=dtype)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> bool:
        """Whether ``mha`` is the packed self-attention layout this module reproduces."""
        return (
            mha._qkv_same_embed_dim
            and mha.in_proj_weight is not None
            and mha.bias_k is None
            and mha.bias_v is None
            and not mha.add_zero_attn
        )

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention) -> ProjectedMultiheadAttention:
        """The same function as ``mha``, its weights copied into ``in_proj`` and ``out_proj``."""
        if not cls.supports(mha):
            raise ValueError("only packed self-attention without bias_k/bias_v/add_zero_attn is supported")
        w = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, batch_first=mha.batch_first,
                  bias=mha.in_proj_bias is not None, device=w.device, dtype=w.dtype)  # fmt: skip
        with torch.no_grad():
            new.in_proj.weight.copy_(w)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.in_proj_bias is not None:
                new.in_proj.bias.copy_(mha.in_proj_bias)
            if mha.out_proj.bias is not None and new.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        # query: (L, N, E), or (N, L, E) with batch_first, or (L, E) unbatched; key/value alike with S
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            key_padding_mask = key_padding_mask.unsqueeze(0) if key_padding_mask is not None else None
        elif self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        length, batch, e = query.shape  # (L, N, E) from here on
        source = key.shape[0]
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # the packed projection's row blocks, applied to each input
            q = self.in_proj(query)[..., :e]
            k = self.in_proj(key)[..., e : 2 * e]
            v = self.in_proj(value)[..., 2 * e :]

        def heads(t: Tensor, n: int) -> Tensor:  # (n, N, E) → (N, H, n, d)
            return t.reshape(n, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

        q, k, v = heads(q, length), heads(k, source), heads(v, source)
        mask = self._mask(attn_mask, key_padding_mask, batch, length, source, q.dtype)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            if is_causal and mask is None:
                causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
                mask = torch.zeros(length, source, dtype=q.dtype, device=q.device).masked_fill(~causal, -math.inf)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, p=dropout, training=self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal and mask is None
            )
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, e))  # (L, N, E)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            out = out.squeeze(1)
            weights = weights.squeeze(0) if weights is not None else None
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, length: int,
              source: int, dtype: torch.dtype) -> Tensor | None:  # fmt: skip
        """One additive float mask broadcastable to (N, H, L, S), or None."""
        mask = None
        if attn_mask is not None:
            m = _additive(attn_mask, dtype)
            mask = m.view(batch, self.num_heads, length, source) if m.dim() == 3 else m
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(batch, 1, 1, source)
            mask = pad if mask is None else mask + pad
        return mask

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def project_attention_(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """Replace every self-attention ``nn.MultiheadAttention`` (or those named in ``names``) by
    :class:`ProjectedMultiheadAttention`, the same function with callable projections; returns
    the names replaced. In place."""
    replaced = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.MultiheadAttention) or not ProjectedMultiheadAttention.supports(module):
            continue
        if names is not None and name not in names:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, ProjectedMultiheadAttention.from_mha(module))
        replaced.append(name)
    return replaced


def projected_attention(model: nn.Module) -> list[str]:
    """Names of the ProjectedMultiheadAttention modules in ``model`` (what a reload must
    replace again with :func:`project_attention_`)."""
    return [n for n, m in model.named_modules() if isinstance(m, ProjectedMultiheadAttention)]


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = not allowed) as 0/−inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, -math.inf)
    return mask.to(dtype)
