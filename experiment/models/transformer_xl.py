"""Transformer-XL (Dai et al. 2019), written from the published equations.

Segment-level recurrence: every layer attends over [mem; current], where `mem` holds the detached inputs of
that layer from the previous `mem_len` positions. Positions are relative: sinusoidal embeddings R of the
query-key distance, and the attention score of query i and key j is (Dai et al. eq. in §3.3)

    A_ij = (q_i + u)^T k_j  +  (q_i + v)^T W_r R_{i-j}
           \\____ (a)+(c) __/    \\______ (b)+(d) _____/

with two learned global biases u (content) and v (position), one pair per layer when `untie_r`.
The output is a full softmax over the vocabulary: the paper's configs have a single adaptive-softmax cluster
that covers the whole vocabulary (cutoffs = [vocab_size]), which is a full softmax. With `projections` (on in
every config of conf/model/, as the reference's adaptive embedding with div_val 4 has them) the word embedding
reaches the layers through an input projection and the tied output reads the last hidden state through an
output projection of its own. Without them the tied head scores the current input token from the start: at
init a post-LN model puts ~40% of its probability on it (5% uniform), and on sorting, where an answer never
repeats its input, the model collapses below chance (docs/results.md).

Carried state (the memory protocol): one (B, M, d_model) tensor per layer plus a (B, M) validity mask shared
by all layers; M grows to `mem_len`. Rows whose memory was reset keep zeros marked invalid, so attention never
reads them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init

from .protocol import MemoryModelOutput, MemoryProtocol


class TransformerXLConfig(PretrainedConfig):
    """Transformer-XL hyperparameters. Defaults are the paper's sorting shape (`transfo-xl-sort`)."""

    model_type = "memoria_transformer_xl"

    vocab_size: int = 21
    d_model: int = 512
    n_layer: int = 4
    n_head: int = 4
    d_head: int = 128
    d_inner: int = 2048
    mem_len: int = 1024  # positions of memory kept per layer
    max_segment_length: int = 1024  # longest segment forward accepts
    same_length: bool = True  # every query sees the same number (mem_len) of keys
    clamp_len: int = 1000  # relative distances beyond this share one embedding; <= 0 disables
    dropout: float = 0.1
    dropatt: float = 0.0
    untie_r: bool = True  # separate u, v biases per layer
    pre_lnorm: bool = False  # Dai et al. use post-LayerNorm
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    projections: bool = False  # input and output projections around the tied embedding (see the module docstring)

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "d_head", "d_inner"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TransformerXLConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.mem_len <= 0:
            raise ValueError(
                f"TransformerXLConfig.mem_len must be > 0, got {self.mem_len}; Transformer-XL without memory "
                "is a plain transformer: use model=gpt2 instead."
            )
        if self.max_segment_length <= 0:
            raise ValueError(
                f"TransformerXLConfig.max_segment_length must be > 0, got {self.max_segment_length}"
            )
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.dropatt < 1.0):
            raise ValueError(f"dropout and dropatt must be in [0, 1), got {self.dropout} and {self.dropatt}")
        super().__post_init__(**kwargs)


# ------------------------------------------------------------------------------------------------------------
# building blocks


def sinusoid_embedding(distances: torch.Tensor, dim: int) -> torch.Tensor:
    """(K,) float distances -> (K, dim) [sin | cos] embeddings (Vaswani et al.), as Transformer-XL's R."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim))
    angles = distances.float()[:, None] * inv_freq[None, :]  # (K, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=-1)  # (K, dim)


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """Turn scores against distances into scores against keys, in O(1) extra memory.

    scores: (B, H, Q, K), column c holding the score of query i against distance K-1-c (the position
    embeddings run from the farthest distance to 0). Returns (B, H, Q, K) whose [i, j] is the score against
    distance (K - Q + i) - j, i.e. key j seen from query i, for every j <= K - Q + i. Entries above that
    diagonal are garbage and must be masked (they are the causal mask's).
    """
    B, H, Q, K = scores.shape
    padded = torch.cat([scores.new_zeros(B, H, Q, 1), scores], dim=-1)  # (B, H, Q, K+1)
    padded = padded.view(B, H, K + 1, Q)  # reading the padded rows column-major shifts row i left by Q-1-i
    return padded[:, :, 1:].reshape(B, H, Q, K)


def attention_allowed(
    query_len: int, mem_len_now: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """(Q, M+Q) bool: query i (at key index M+i) may see key j when j <= M+i and, with a window, M+i-j <
    window."""
    query_index = torch.arange(query_len, device=device)[:, None] + mem_len_now  # (Q, 1)
    key_index = torch.arange(mem_len_now + query_len, device=device)[None, :]  # (1, K)
    allowed = key_index <= query_index
    if window is not None:
        allowed = allowed & (query_index - key_index < window)
    return allowed


class RelativeMultiHeadAttention(nn.Module):
    """Transformer-XL attention over [mem; h] with relative positions and the global biases u, v."""

    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_head
        inner = config.n_head * config.d_head
        self.qkv_net = nn.Linear(config.d_model, 3 * inner, bias=False)
        self.r_net = nn.Linear(config.d_model, inner, bias=False)  # W_{k,R}
        self.o_net = nn.Linear(inner, config.d_model, bias=False)
        self.drop = nn.Dropout(config.dropout)
        self.dropatt = nn.Dropout(config.dropatt)
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.pre_lnorm = config.pre_lnorm
        self.scale = 1.0 / math.sqrt(config.d_head)

    def forward(
        self,
        h: torch.Tensor,  # (B, Q, d)
        mem: torch.Tensor,  # (B, M, d)
        pos_emb: torch.Tensor,  # (K, d), distances K-1 .. 0
        r_w_bias: torch.Tensor,  # (H, Dh) u
        r_r_bias: torch.Tensor,  # (H, Dh) v
        allowed: torch.Tensor,  # (B, Q, K) bool
    ) -> torch.Tensor:
        B, Q, _ = h.shape
        K = mem.size(1) + Q
        cat = torch.cat([mem, h], dim=1)  # (B, K, d)
        if self.pre_lnorm:
            cat = self.layer_norm(cat)
        q, k, v = self.qkv_net(cat).chunk(3, dim=-1)  # each (B, K, H*Dh)
        q = q[:, -Q:].view(B, Q, self.n_head, self.d_head)  # queries only for the current segment
        k = k.view(B, K, self.n_head, self.d_head)
        v = v.view(B, K, self.n_head, self.d_head)
        r_k = self.r_net(pos_emb).view(K, self.n_head, self.d_head)  # (K, H, Dh)

        content = torch.einsum("bqhd,bkhd->bhqk", q + r_w_bias, k)  # (a) + (c)
        position = rel_shift(torch.einsum("bqhd,khd->bhqk", q + r_r_bias, r_k))  # (b) + (d)
        scores = (content + position) * self.scale  # (B, H, Q, K)
        # finite fill: a query that may see nothing gets a uniform (harmless) distribution instead of NaN
        scores = scores.float().masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        probs = self.dropatt(scores.softmax(dim=-1).to(v.dtype))
        context = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, Q, self.n_head * self.d_head)
        out = self.drop(self.o_net(context))  # (B, Q, d)
        return h + out if self.pre_lnorm else self.layer_norm(h + out)


class PositionwiseFF(nn.Module):
    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.d_model, config.d_inner),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.d_inner, config.d_model),
            nn.Dropout(config.dropout),
        )
        self.layer_norm = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.pre_lnorm = config.pre_lnorm

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.pre_lnorm:
            return h + self.net(self.layer_norm(h))
        return self.layer_norm(h + self.net(h))


class TransformerXLLayer(nn.Module):
    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        self.attn = RelativeMultiHeadAttention(config)
        self.ff = PositionwiseFF(config)
        if config.untie_r:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))

    def forward(self, h, mem, pos_emb, r_w_bias, r_r_bias, allowed):
        return self.ff(self.attn(h, mem, pos_emb, r_w_bias, r_r_bias, allowed))


class TransformerXLModel(nn.Module):
    """The stack: scaled word embeddings -> layers over [mem; h] -> hidden states of every layer's input."""

    def __init__(self, config: TransformerXLConfig):
        super().__init__()
        self.config = config
        self.word_emb = nn.Embedding(config.vocab_size, config.d_model)
        # the adaptive embedding's projection of its one cluster (reference: div_val 4), or none
        self.emb_proj = nn.Linear(config.d_model, config.d_model, bias=False) if config.projections else None
        self.emb_scale = config.d_model**0.5
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([TransformerXLLayer(config) for _ in range(config.n_layer)])
        if not config.untie_r:
            self.r_w_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))
            self.r_r_bias = nn.Parameter(torch.zeros(config.n_head, config.d_head))

    def forward(
        self,
        input_ids: torch.Tensor,
        mems: list[torch.Tensor],
        mem_valid: torch.Tensor,
        token_valid: torch.Tensor,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids (B, Q), mems n_layer x (B, M, d), mem_valid (B, M), token_valid (B, Q).

        Returns the last hidden states (B, Q, d) and the input of every layer (n_layer x (B, Q, d)) for the
        memory.
        """
        config = self.config
        Q, M = input_ids.size(1), mem_valid.size(1)
        K = M + Q
        emb = self.word_emb(input_ids)  # (B, Q, d)
        if self.emb_proj is not None:
            emb = self.emb_proj(emb)
        h = self.drop(emb * self.emb_scale)  # (B, Q, d)

        distances = torch.arange(K - 1, -1, -1, device=h.device, dtype=torch.float32)  # (K,) farthest first
        if config.clamp_len > 0:
            distances = distances.clamp(max=config.clamp_len)
        pos_emb = self.drop(sinusoid_embedding(distances, config.d_model).to(h.dtype))  # (K, d)

        window = config.mem_len if config.same_length else None
        allowed = attention_allowed(Q, M, window, h.device)  # (Q, K)
        key_valid = torch.cat([mem_valid, token_valid], dim=1)  # (B, K)
        allowed = allowed[None] & key_valid[:, None, :]  # (B, Q, K)

        layer_inputs = []
        for i, layer in enumerate(self.layers):
            layer_inputs.append(h)
            owner = layer if config.untie_r else self
            h = layer(h, mems[i], pos_emb, owner.r_w_bias, owner.r_r_bias, allowed)
        return self.drop(h), layer_inputs


# ------------------------------------------------------------------------------------------------------------
# the LM model and its memory protocol


class TransformerXLPreTrainedModel(PreTrainedModel):
    config_class = TransformerXLConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["TransformerXLLayer"]  # noqa: RUF012  (transformers convention: the repeated block)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, (TransformerXLLayer, TransformerXLModel)) and hasattr(module, "r_w_bias"):
            init.normal_(module.r_w_bias, mean=0.0, std=std)
            init.normal_(module.r_r_bias, mean=0.0, std=std)


class TransformerXLLMHeadModel(TransformerXLPreTrainedModel, MemoryProtocol):
    """Transformer-XL language model carrying its per-layer memories from one call to the next."""

    memory_kind = "transformer_xl"
    _tied_weights_keys = {"lm_head.weight": "transformer.word_emb.weight"}  # noqa: RUF012  (HF convention)

    def __init__(self, config: TransformerXLConfig):
        super().__init__(config)
        self.transformer = TransformerXLModel(config)
        # the adaptive softmax's output projection of its one cluster, not tied to the input's (reference: tie_projs
        # False for the first cluster), or none
        self.out_proj = nn.Linear(config.d_model, config.d_model, bias=False) if config.projections else None
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=True)
        self._mems: list[torch.Tensor] | None = None  # n_layer x (B, M, d); None = empty
        self._mem_valid: torch.Tensor | None = None  # (B, M) bool
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.word_emb

    def set_input_embeddings(self, value):
        self.transformer.word_emb = value

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def max_segment_length(self) -> int:
        return int(self.config.max_segment_length)

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemoryModelOutput:
        token_valid = check_segment_inputs(
            "Transformer-XL", input_ids, attention_mask, labels, self.max_segment_length, "max_segment_length"
        )
        B = input_ids.size(0)
        mems, mem_valid = self._memory_for(B, input_ids.device)

        hidden, layer_inputs = self.transformer(input_ids, mems, mem_valid, token_valid)
        logits = self.lm_head(hidden if self.out_proj is None else self.out_proj(hidden))  # (B, Q, V)
        self._update_memory(mems, mem_valid, layer_inputs, token_valid)

        aux_loss = logits.new_zeros(())
        loss = None
        if labels is not None:
            loss = shifted_lm_loss(logits, labels) + aux_loss
        return MemoryModelOutput(loss=loss, logits=logits, aux_loss=aux_loss, hidden_states=hidden)

    def _memory_for(self, batch_size: int, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        d = self.config.d_model
        dtype = self.transformer.word_emb.weight.dtype
        if self._mems is None:
            empty = torch.zeros(batch_size, 0, d, device=device, dtype=dtype)
            return [empty] * self.config.n_layer, torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
        if self._mem_valid.size(0) != batch_size:
            raise ValueError(
                f"Transformer-XL memory holds {self._mem_valid.size(0)} rows but the input has {batch_size}; "
                "call reset_memory() before changing the batch size."
            )
        mems = [m.to(device=device, dtype=dtype) for m in self._mems]
        if not torch.is_inference_mode_enabled():
            # memory written under inference_mode (evaluation) cannot be saved for backward: use a copy
            mems = [m.clone() if m.is_inference() else m for m in mems]
        return mems, self._mem_valid.to(device)

    @torch.no_grad()
    def _update_memory(self, mems, mem_valid, layer_inputs, token_valid) -> None:
        keep = self.config.mem_len
        self._mems = [torch.cat([m, h.detach()], dim=1)[:, -keep:] for m, h in zip(mems, layer_inputs)]
        self._mem_valid = torch.cat([mem_valid, token_valid], dim=1)[:, -keep:]

    # ---- memory protocol ----------------------------------------------------------------------------------

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        if rows is None or self._mems is None:
            self._mems, self._mem_valid = None, None
            return
        rows = check_reset_rows(rows, self._mem_valid.size(0)).to(self._mem_valid.device)
        self._mems = [m.masked_fill(rows[:, None, None], 0.0) for m in self._mems]
        self._mem_valid = self._mem_valid & ~rows[:, None]

    def get_memory_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"memory_kind": self.memory_kind}
        if self._mems is not None:
            state["mems"] = [m.detach().clone() for m in self._mems]
            state["mem_valid"] = self._mem_valid.clone()
        return state

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)
        if "mems" not in state:
            self.reset_memory()
            return
        mems, valid = state["mems"], state["mem_valid"]
        config = self.config
        if len(mems) != config.n_layer:
            raise ValueError(f"memory state has {len(mems)} layers, this Transformer-XL has {config.n_layer}")
        B, M = valid.shape
        if M > config.mem_len:
            raise ValueError(f"memory state holds {M} positions, more than mem_len={config.mem_len}")
        for m in mems:
            if tuple(m.shape) != (B, M, config.d_model):
                raise ValueError(
                    f"memory state tensor of shape {tuple(m.shape)} does not fit (batch {B}, length {M}, "
                    f"d_model {config.d_model}); it was written by a different Transformer-XL configuration."
                )
        device = self.transformer.word_emb.weight.device
        self._mems = [m.detach().clone().to(device) for m in mems]
        self._mem_valid = valid.clone().bool().to(device)

    def memory_stats(self) -> dict[str, float]:
        if self._mems is None:
            return {"mem_length": 0.0, "mem_valid_fraction": 0.0}
        return {
            "mem_length": float(self._mem_valid.size(1)),
            "mem_valid_fraction": float(self._mem_valid.float().mean().item())
            if self._mem_valid.numel()
            else 0.0,
        }


# ------------------------------------------------------------------------------------------------------------
# shared helpers


def shifted_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean NLL of position t predicting labels[t+1] (HF convention; -100 is ignored)."""
    shift_logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if (shift_labels != -100).sum() == 0:
        return logits.new_zeros(()).float() + 0.0 * shift_logits.sum()
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def check_reset_rows(rows: torch.Tensor, batch_size: int) -> torch.Tensor:
    rows = torch.as_tensor(rows)
    if rows.dtype != torch.bool or rows.dim() != 1 or rows.numel() != batch_size:
        raise ValueError(
            f"reset_memory(rows=...) needs a bool mask of shape ({batch_size},), got {rows.dtype} "
            f"{tuple(rows.shape)}; pass rows=None to reset every row."
        )
    return rows


def check_segment_inputs(
    model: str, input_ids: torch.Tensor, attention_mask, labels, max_length: int, length_key: str
) -> torch.Tensor:
    """Refuse a malformed segment before any compute; return the (B, T) bool mask of real tokens."""
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ValueError(
            f"input_ids must be a non-empty (batch, time) tensor, got shape {tuple(input_ids.shape)}"
        )
    T = input_ids.size(1)
    if T > max_length:
        raise ValueError(
            f"segment of {T} tokens is longer than this {model} accepts ({max_length}); use a shorter "
            f"segment_size or raise model.config.{length_key}."
        )
    for name, tensor in (("attention_mask", attention_mask), ("labels", labels)):
        if tensor is not None and tuple(tensor.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(tensor.shape)}"
            )
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.to(input_ids.device).bool()


AutoConfig.register(TransformerXLConfig.model_type, TransformerXLConfig, exist_ok=True)
AutoModel.register(TransformerXLConfig, TransformerXLLMHeadModel, exist_ok=True)
AutoModelForCausalLM.register(TransformerXLConfig, TransformerXLLMHeadModel, exist_ok=True)
