"""Compressive Transformer (Rae et al. 2019), written from the paper.

Every layer keeps a memory of the last `mem_len` states and a compressed memory of `cmem_len` older ones and
attends over [cmem; mem; current]. States pushed out of `mem` are compressed by a strided Conv1d
(kernel = stride = `compression_ratio`, 4 in the paper's configs) and appended to `cmem`; the oldest
compressed states fall off the end.

Choices where the paper leaves room (experiments.md §d.2):
- Positions: a learned relative-position table per layer, one scalar bias per head and query-key distance,
  added to the attention scores. Distances count key slots in [cmem; mem; current], so one compressed slot is
  one step of distance, and positions restart nowhere: the model has no absolute positions at all.
- Blocks are pre-LayerNorm (GPT-2 style); memories hold the un-normalised states and the layer's LayerNorm is
  applied to them with the current states.
- Eviction takes a multiple of the compression ratio (the oldest states first), so no state is dropped
  uncompressed; `mem` then holds between mem_len - ratio + 1 and mem_len states.
- Enhanced recurrence (`enhanced_recurrence`): layer l's memory stores the *output* of layer l (the input of
  the layer above) instead of its input, so each layer sees memories one layer higher. The top layer keeps
  its own output (rolling the per-layer memories by one would hand it the embeddings instead).
- Attention-reconstruction loss: for each layer that compressed something this step, the MSE between the
  content-based attention of the current queries over the evicted states and over their compression. It uses
  detached copies of the layer's LayerNorm / query / key / value weights and detached states, out of place, so
  only the compression network learns from it and no parameter is ever frozen (the reference froze every K/V
  weight with an in-place detach_). aux_loss = reconstruction_loss_weight x mean over layers.
- Not implemented: GRU gating (off in every paper config), other compression functions, and the reference's
  K/V-freezing defect.
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
from .transformer_xl import check_reset_rows, check_segment_inputs, shifted_lm_loss


class CompressiveConfig(PretrainedConfig):
    """Compressive Transformer hyperparameters. Defaults are the paper's sorting shape
    (compressive-former-sort)."""

    model_type = "memoria_compressive"

    vocab_size: int = 21
    d_model: int = 512
    n_layer: int = 4
    n_head: int = 4
    d_inner: int | None = None  # 4 * d_model when None
    mem_len: int = 512
    cmem_len: int = 512
    compression_ratio: int = 4
    max_segment_length: int = 1024
    enhanced_recurrence: bool = True
    reconstruction_loss_weight: float = 1.0
    dropout: float = 0.1  # embedding, residual and feed-forward dropout
    attn_dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_segment_length"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"CompressiveConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"CompressiveConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.compression_ratio < 1:
            raise ValueError(
                f"CompressiveConfig.compression_ratio must be >= 1, got {self.compression_ratio}"
            )
        if self.mem_len <= 0 or self.cmem_len <= 0:
            raise ValueError(
                f"CompressiveConfig.mem_len and cmem_len must be > 0, got {self.mem_len} and "
                f"{self.cmem_len}; "
                "without memory use model=gpt2, without compressed memory use model=transformer_xl."
            )
        if self.mem_len < self.compression_ratio:
            raise ValueError(
                f"CompressiveConfig.mem_len ({self.mem_len}) must be >= compression_ratio "
                f"({self.compression_ratio}) so evicted states can always be compressed in whole groups."
            )
        if self.reconstruction_loss_weight < 0:
            raise ValueError(
                f"reconstruction_loss_weight must be >= 0, got {self.reconstruction_loss_weight}"
            )
        if not (0.0 <= self.dropout < 1.0 and 0.0 <= self.attn_dropout < 1.0):
            raise ValueError(
                f"dropout and attn_dropout must be in [0, 1), got {self.dropout}, {self.attn_dropout}"
            )
        super().__post_init__(**kwargs)

    @property
    def inner_dim(self) -> int:
        return self.d_inner or 4 * self.d_model

    @property
    def max_distance(self) -> int:
        """Largest query-key distance: a full segment's last query against the oldest compressed slot."""
        return self.max_segment_length + self.mem_len + self.cmem_len - 1


# ------------------------------------------------------------------------------------------------------------
# building blocks


class CompressiveAttention(nn.Module):
    """Multi-head attention of the current queries over [cmem; mem; current] with a learned distance bias."""

    def __init__(self, config: CompressiveConfig):
        super().__init__()
        self.n_head, self.d_head = config.n_head, config.d_model // config.n_head
        self.q_proj = nn.Linear(config.d_model, config.d_model)
        self.kv_proj = nn.Linear(config.d_model, 2 * config.d_model)
        self.out_proj = nn.Linear(config.d_model, config.d_model)
        self.rel_pos_bias = nn.Parameter(torch.zeros(config.n_head, config.max_distance + 1))  # (H, D+1)
        self.attn_drop = nn.Dropout(config.attn_dropout)
        self.resid_drop = nn.Dropout(config.dropout)
        self.scale = 1.0 / math.sqrt(self.d_head)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_head, self.d_head).transpose(1, 2)  # (B, H, L, Dh)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """queries (B, T, d) normed current states; keys (B, K, d) normed [cmem; mem; current];
        allowed (B, T, K)."""
        B, T, d = queries.shape
        K = keys.size(1)
        q = self.split_heads(self.q_proj(queries))  # (B, H, T, Dh)
        k, v = (self.split_heads(t) for t in self.kv_proj(keys).chunk(2, dim=-1))  # (B, H, K, Dh)
        query_index = torch.arange(T, device=q.device)[:, None] + (K - T)  # (T, 1) key index of each query
        distance = query_index - torch.arange(K, device=q.device)[None]  # (T, K)
        bias = self.rel_pos_bias[:, distance.clamp(min=0)]  # (H, T, K); negative distances are masked below
        scores = (q @ k.transpose(-1, -2)) * self.scale + bias  # (B, H, T, K)
        scores = scores.float().masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
        probs = self.attn_drop(scores.softmax(dim=-1).to(v.dtype))
        context = (probs @ v).transpose(1, 2).reshape(B, T, d)  # (B, T, d)
        return self.resid_drop(self.out_proj(context))

    def content_attention_detached(self, queries: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Content-only attention (no positions, no mask) of queries (B, T, d) over memory (B, N, d) with
        detached copies of the projection weights: gradient reaches `memory` only. Returns the per-head
        contexts (B, T, d)."""
        d = queries.size(-1)
        q = self.split_heads(F.linear(queries, self.q_proj.weight.detach(), self.q_proj.bias.detach()))
        kv = F.linear(memory, self.kv_proj.weight.detach(), self.kv_proj.bias.detach())
        k, v = (self.split_heads(t) for t in kv.chunk(2, dim=-1))
        probs = ((q @ k.transpose(-1, -2)) * self.scale).float().softmax(dim=-1).to(v.dtype)  # (B, H, T, N)
        return (probs @ v).transpose(1, 2).reshape(queries.size(0), queries.size(1), d)


class CompressiveBlock(nn.Module):
    def __init__(self, config: CompressiveConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attn = CompressiveAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, config.inner_dim),
            nn.GELU(),
            nn.Linear(config.inner_dim, config.d_model),
            nn.Dropout(config.dropout),
        )
        # the compression function f_c: (B, d, ratio * n) -> (B, d, n)
        self.compress = nn.Conv1d(
            config.d_model,
            config.d_model,
            kernel_size=config.compression_ratio,
            stride=config.compression_ratio,
        )

    def forward(
        self, x: torch.Tensor, cmem: torch.Tensor, mem: torch.Tensor, allowed: torch.Tensor
    ) -> torch.Tensor:
        keys = self.ln_1(torch.cat([cmem, mem, x], dim=1))  # (B, C+M+T, d)
        x = x + self.attn(keys[:, -x.size(1) :], keys, allowed)
        return x + self.mlp(self.ln_2(x))

    def compress_states(self, states: torch.Tensor) -> torch.Tensor:
        """(B, ratio * n, d) -> (B, n, d)."""
        return self.compress(states.transpose(1, 2)).transpose(1, 2)

    def reconstruction_loss(
        self, x: torch.Tensor, old: torch.Tensor, compressed: torch.Tensor
    ) -> torch.Tensor:
        """Rae et al.'s attention-reconstruction loss for this layer, learning only the compression network.

        x (B, T, d) current layer input (the queries), old (B, ratio*n, d) evicted states,
        compressed (B, n, d).
        """
        w, b, eps = self.ln_1.weight.detach(), self.ln_1.bias.detach(), self.ln_1.eps

        def norm(t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, t.shape[-1:], w, b, eps)

        queries = norm(x.detach())
        target = self.attn.content_attention_detached(queries, norm(old.detach()))
        reconstruction = self.attn.content_attention_detached(queries, norm(compressed))
        return F.mse_loss(reconstruction.float(), target.float())


class CompressiveModel(nn.Module):
    def __init__(self, config: CompressiveConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList([CompressiveBlock(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.d_model, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, cmems, mems, cmem_valid, mem_valid, token_valid):
        """Returns final hidden states (B, T, d), every layer's input and every layer's output
        (n_layer x (B, T, d))."""
        T = input_ids.size(1)
        C, M = cmem_valid.size(1), mem_valid.size(1)
        key_index = torch.arange(C + M + T, device=input_ids.device)
        query_index = torch.arange(T, device=input_ids.device) + C + M
        causal = key_index[None, :] <= query_index[:, None]  # (T, K)
        key_valid = torch.cat([cmem_valid, mem_valid, token_valid], dim=1)  # (B, K)
        allowed = causal[None] & key_valid[:, None, :]  # (B, T, K)

        x = self.drop(self.wte(input_ids))  # (B, T, d)
        inputs, outputs = [], []
        for layer, cmem, mem in zip(self.layers, cmems, mems):
            inputs.append(x)
            x = layer(x, cmem, mem, allowed)
            outputs.append(x)
        return self.ln_f(x), inputs, outputs


# ------------------------------------------------------------------------------------------------------------
# the LM model and its memory protocol


class CompressivePreTrainedModel(PreTrainedModel):
    config_class = CompressiveConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["CompressiveBlock"]  # noqa: RUF012  (transformers convention: the repeated block)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CompressiveAttention):
            init.zeros_(module.rel_pos_bias)


class CompressiveLMHeadModel(CompressivePreTrainedModel, MemoryProtocol):
    """Compressive Transformer language model carrying mems and cmems from one call to the next."""

    memory_kind = "compressive"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # noqa: RUF012  (HF convention)

    def __init__(self, config: CompressiveConfig):
        super().__init__(config)
        self.transformer = CompressiveModel(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # mems, cmems (n_layer x (B, L, d)), mem_valid, cmem_valid (B, L)
        self._state: dict[str, Any] | None = None
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    @property
    def max_segment_length(self) -> int:
        return int(self.config.max_segment_length)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemoryModelOutput:
        token_valid = check_segment_inputs(
            "Compressive Transformer",
            input_ids,
            attention_mask,
            labels,
            self.max_segment_length,
            "max_segment_length",
        )
        B = input_ids.size(0)
        state = self._memory_for(B, input_ids.device)
        hidden, inputs, outputs = self.transformer(
            input_ids, state["cmems"], state["mems"], state["cmem_valid"], state["mem_valid"], token_valid
        )
        logits = self.lm_head(hidden)  # (B, T, V)
        new_states = outputs if self.config.enhanced_recurrence else inputs
        aux_loss = (
            self._update_memory(state, inputs, new_states, token_valid)
            * self.config.reconstruction_loss_weight
        )

        loss = None
        if labels is not None:
            loss = shifted_lm_loss(logits, labels) + aux_loss
        return MemoryModelOutput(loss=loss, logits=logits, aux_loss=aux_loss, hidden_states=hidden)

    def _memory_for(self, batch_size: int, device: torch.device) -> dict[str, Any]:
        d, n = self.config.d_model, self.config.n_layer
        dtype = self.transformer.wte.weight.dtype
        if self._state is None:
            empty = torch.zeros(batch_size, 0, d, device=device, dtype=dtype)
            no_valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)
            return {"mems": [empty] * n, "cmems": [empty] * n, "mem_valid": no_valid, "cmem_valid": no_valid}
        if self._state["mem_valid"].size(0) != batch_size:
            raise ValueError(
                f"Compressive Transformer memory holds {self._state['mem_valid'].size(0)} rows but the input "
                f"has {batch_size}; call reset_memory() before changing the batch size."
            )

        def usable(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device=device, dtype=dtype)
            # memory written under inference_mode (evaluation) cannot be saved for backward: use a copy
            return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t

        return {
            "mems": [usable(m) for m in self._state["mems"]],
            "cmems": [usable(m) for m in self._state["cmems"]],
            "mem_valid": self._state["mem_valid"].to(device),
            "cmem_valid": self._state["cmem_valid"].to(device),
        }

    def _update_memory(self, state, inputs, new_states, token_valid) -> torch.Tensor:
        """Push this segment into mem, compress what falls out into cmem; return the mean reconstruction
        loss."""
        config = self.config
        ratio = config.compression_ratio
        all_valid = torch.cat([state["mem_valid"], token_valid], dim=1)  # (B, M+T)
        overflow = all_valid.size(1) - config.mem_len
        # whole groups of `ratio`, oldest first
        n_evict = 0 if overflow <= 0 else -(-overflow // ratio) * ratio

        mems, cmems, losses = [], [], []
        cmem_valid = state["cmem_valid"]
        if n_evict:
            evicted_valid = all_valid[:, :n_evict].view(-1, n_evict // ratio, ratio).any(dim=-1)  # (B, n)
            cmem_valid = torch.cat([cmem_valid, evicted_valid], dim=1)[:, -config.cmem_len :]
        for layer, x, mem, cmem, states in zip(
            self.transformer.layers, inputs, state["mems"], state["cmems"], new_states
        ):
            all_states = torch.cat([mem, states.detach()], dim=1)  # (B, M+T, d)
            if n_evict:
                old = all_states[:, :n_evict]
                compressed = layer.compress_states(old)  # (B, n_evict / ratio, d), with grad for the aux loss
                if config.reconstruction_loss_weight > 0:
                    losses.append(layer.reconstruction_loss(x, old, compressed))
                cmem = torch.cat([cmem, compressed.detach()], dim=1)[:, -config.cmem_len :]
            mems.append(all_states[:, n_evict:])
            cmems.append(cmem)
        self._state = {
            "mems": mems,
            "cmems": cmems,
            "mem_valid": all_valid[:, n_evict:],
            "cmem_valid": cmem_valid,
        }
        if not losses:
            # nothing compressed: an exact zero that still touches the compression network, so DDP sees
            # every parameter used on every step (experiments.md §f.4)
            compression = [p for layer in self.transformer.layers for p in layer.compress.parameters()]
            return 0.0 * sum(p.sum() for p in compression)
        return torch.stack(losses).mean()

    # ---- memory protocol ----------------------------------------------------------------------------------

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        if rows is None or self._state is None:
            self._state = None
            return
        s = self._state
        rows = check_reset_rows(rows, s["mem_valid"].size(0)).to(s["mem_valid"].device)
        self._state = {
            "mems": [m.masked_fill(rows[:, None, None], 0.0) for m in s["mems"]],
            "cmems": [m.masked_fill(rows[:, None, None], 0.0) for m in s["cmems"]],
            "mem_valid": s["mem_valid"] & ~rows[:, None],
            "cmem_valid": s["cmem_valid"] & ~rows[:, None],
        }

    def get_memory_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"memory_kind": self.memory_kind}
        if self._state is not None:
            s = self._state
            state.update(
                mems=[m.detach().clone() for m in s["mems"]],
                cmems=[m.detach().clone() for m in s["cmems"]],
                mem_valid=s["mem_valid"].clone(),
                cmem_valid=s["cmem_valid"].clone(),
            )
        return state

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)
        if "mems" not in state:
            self.reset_memory()
            return
        config = self.config
        for key, limit, valid_key in (
            ("mems", config.mem_len, "mem_valid"),
            ("cmems", config.cmem_len, "cmem_valid"),
        ):
            tensors, valid = state[key], state[valid_key]
            if len(tensors) != config.n_layer:
                raise ValueError(
                    f"memory state has {len(tensors)} layers of {key}, this model has {config.n_layer}"
                )
            B, L = valid.shape
            if L > limit or B != state["mem_valid"].size(0):
                raise ValueError(
                    f"memory state's {key} of shape ({B}, {L}) does not fit this model (length <= {limit})"
                )
            for t in tensors:
                if tuple(t.shape) != (B, L, config.d_model):
                    raise ValueError(
                        f"memory state tensor of shape {tuple(t.shape)} does not fit ({B}, {L}, "
                        f"{config.d_model}); it was written by a different Compressive Transformer "
                        "configuration."
                    )
        device = self.transformer.wte.weight.device
        self._state = {
            "mems": [m.detach().clone().to(device) for m in state["mems"]],
            "cmems": [m.detach().clone().to(device) for m in state["cmems"]],
            "mem_valid": state["mem_valid"].clone().bool().to(device),
            "cmem_valid": state["cmem_valid"].clone().bool().to(device),
        }

    def memory_stats(self) -> dict[str, float]:
        if self._state is None:
            return {"mem_length": 0.0, "cmem_length": 0.0}
        return {
            "mem_length": float(self._state["mem_valid"].size(1)),
            "cmem_length": float(self._state["cmem_valid"].size(1)),
        }


AutoConfig.register(CompressiveConfig.model_type, CompressiveConfig, exist_ok=True)
AutoModel.register(CompressiveConfig, CompressiveLMHeadModel, exist_ok=True)
AutoModelForCausalLM.register(CompressiveConfig, CompressiveLMHeadModel, exist_ok=True)
