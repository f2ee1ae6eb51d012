"""Abstractor: summarises a segment's hidden states into a fixed number of working-memory engrams."""

from __future__ import annotations

import torch
from torch import nn


class Abstractor(nn.Module):
    """(B, T, H) -> (B, num_memories, H).

    Nm learned queries attend over the segment with one head, no 1/sqrt(H) scale and no padding mask (as in the
    paper's module), then two linears with nothing between them. Parameter names match the reference package, so
    its checkpoints load. The key and value transforms and the output layer are applied through their weights
    (their forward is not called; see `forward`). Options (off by default): `key_padding_mask` in forward, and
    `activation` between the linears.
    """

    def __init__(self, num_memories: int, hidden_dim: int, feedforward_dim: int, activation: str | None = None) -> None:
        super().__init__()
        sizes = (("num_memories", num_memories), ("hidden_dim", hidden_dim), ("feedforward_dim", feedforward_dim))
        for name, v in sizes:
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Abstractor {name} must be a positive int, got {v!r}")
        if activation not in (None, "gelu", "relu"):
            raise ValueError(f"Abstractor activation must be None, 'gelu' or 'relu', got {activation!r}")
        self.num_memories = num_memories
        self.query_embeddings = nn.Parameter(torch.randn(1, num_memories, hidden_dim) * 0.02)  # (1, Nm, H)
        self.key_transform = nn.Linear(hidden_dim, hidden_dim)
        self.value_transform = nn.Linear(hidden_dim, hidden_dim)
        self.feedforward = nn.Linear(hidden_dim, feedforward_dim)
        self.output = nn.Linear(feedforward_dim, hidden_dim)
        self.activation = {None: nn.Identity(), "gelu": nn.GELU(), "relu": nn.ReLU()}[activation]

    def forward(self, hidden: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden.dim() != 3 or hidden.shape[-1] != self.query_embeddings.shape[-1]:
            raise ValueError(
                f"Abstractor expects (B, T, {self.query_embeddings.shape[-1]}), got {tuple(hidden.shape)}"
            )
        # The paper's single head, q . key_transform(x) and softmax(...) @ value_transform(x), computed without
        # projecting every token: q . (W_k x + b_k) = (q W_k) . x + q . b_k, and since each softmax row sums to 1,
        # p @ (x W_v^T + b_v) = (p @ x) W_v^T + b_v: equal up to rounding, with H x H products over Nm rows, not B*T.
        q = self.query_embeddings[0]  # (Nm, H)
        q_keys = q @ self.key_transform.weight  # (Nm, H)
        q_bias = self.key_transform.bias @ q.t()  # (Nm,) the same for every token: kept for exactness and DDP
        scores = (hidden @ q_keys.t()).transpose(1, 2) + q_bias[:, None]  # (B, Nm, T)
        if key_padding_mask is not None:  # (B, T) True = real token
            scores = scores.masked_fill(~key_padding_mask[:, None, :].bool(), torch.finfo(scores.dtype).min)
        summary = self.value_transform(scores.softmax(-1) @ hidden)  # (B, Nm, H)
        wide = self.activation(self.feedforward(summary))  # (B, Nm, F)
        # The output layer's bias added after its product, not inside it: on an H100 cuBLAS ran this small-output,
        # long-reduction product (400 x 3072 x 768 at the LM shape) 2.2x slower with the bias fused than without
        # (120 against 54 us; docs/benchmarks.md). The same sum; the bias in the product's dtype (autocast).
        out = nn.functional.linear(wide, self.output.weight)  # (B, Nm, H)
        return out + self.output.bias.to(out.dtype)
