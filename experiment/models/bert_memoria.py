"""BERT and RoBERTa with Memoria (reference model types `memoria_bert`, `memoria_roberta`; algorithm.md §e.2).

transformers' own BERT / RoBERTa embeddings and layers. Layers 0..`memory_layer_index` are stock; each layer above
it gains one memory cross-attention (an HF attention used as cross-attention, post-LN residual inside its output
sub-layer) shared by two paths:

    h = SelfAttn(h)                                    stock, post-LN
    h = MemAttn(h; kv = working memory)                the Abstractor's summary of *this* segment after layer idx
    h = MemAttn(h; kv = reminded memory)               engrams Memoria recalled for this segment (same module)
    h = FFN(h)                                         stock, post-LN

One forward call is one 512-token segment of a document. After layer `memory_layer_index`:
    WM = Abstractor(hidden of that layer)   (B, W, H), with gradient, padding summarised too (as in the reference)
    memories, indices = memoria.add_and_remind(WM, mask=rows with a token)   (B, M, H), (B, M); -1 = none
On a document's first segment the reminded set is empty (no short-term memory yet): the reminded path then leaves
h unchanged. After the layers, Δ = mean reminded attention over the memory layers, heads and non-padding queries
× M_b × α adjusts the memory (algorithm.md §e.1's formula).

Parameter names are those of BertForSequenceClassification / RobertaForSequenceClassification, so a plain BERT /
RoBERTa checkpoint loads with only the memory parts new (`memory_attention` of the layers above the index and the
Abstractor; `new_parameters` lists them after `from_pretrained`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSequenceClassification,
    BertConfig,
    RobertaConfig,
)
from transformers import initialization as init
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import (
    BertAttention,
    BertEmbeddings,
    BertLayer,
    BertPooler,
    BertPreTrainedModel,
)
from transformers.models.roberta.modeling_roberta import (
    RobertaAttention,
    RobertaClassificationHead,
    RobertaEmbeddings,
    RobertaLayer,
    RobertaPreTrainedModel,
)
from transformers.pytorch_utils import apply_chunking_to_forward

from memoria import Abstractor, EngramType, Memoria

from .gpt2_memoria import LTM_SEARCHES, WEIGHT_FORMS, MemorySource, lifespan_delta, memory_source
from .protocol import MemoryModelOutput, MemoryOfBaseModel, MemoryProtocol

log = logging.getLogger(__name__)

BERT_KIND = "memoria_bert"
ROBERTA_KIND = "memoria_roberta"


# ------------------------------------------------------------------------------------------------------------ config
MEMORIA_FIELDS_DOC = """The Memoria fields both configs add (defaults: experiments.md §b.1, memoria_bert/_roberta).

    memory_layer_index            layers with a larger index get the memory attention; the Abstractor reads the
                                  output of this layer (9 of 0..11: layers 10 and 11 read memory)
    memoria_num_memories          W, working-memory engrams per segment (Abstractor slots)
    memoria_lifespan_extend_scale alpha
    memoria_num_reminded_stm / _ltm, memoria_stm_capacity, memoria_ltm_search_depth, memoria_initial_lifespan
    memoria_reset_period          unused by classification (memory resets every batch); kept for the reference
    memoria_write_empty_segments  True = write all-padding segments to memory too (the reference); False (ours) =
                                  a row whose segment is all padding adds nothing
    memoria_device, _weight_form, _seed, _deterministic, _ltm_capacity, _cuda_graph, _compile, _fused_walk, and the
    ablations _use_working_memory, _use_short_term, _use_long_term, _ltm_search: as in GPT2WithMemoriaConfig
    """


def check_encoder_memoria_config(config: MemoriaBertConfig | MemoriaRobertaConfig) -> None:
    """Raise ValueError naming the bad Memoria setting and what it must be."""
    name_of = type(config).__name__
    for name, allow_zero, allow_none, integer in (
        ("memoria_lifespan_extend_scale", True, False, False), ("memoria_num_reminded_stm", True, False, True),
        ("memoria_num_reminded_ltm", True, False, True), ("memoria_stm_capacity", False, False, True),
        ("memoria_ltm_search_depth", True, False, True), ("memoria_initial_lifespan", False, False, False),
        ("memoria_reset_period", False, False, True), ("memoria_ltm_capacity", False, True, True),
    ):
        value = getattr(config, name)
        if value is None and allow_none:
            continue
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type or not math.isfinite(value) or value < 0 or (
                value == 0 and not allow_zero):
            raise ValueError(f"{name_of}.{name} must be {'an integer' if integer else 'a number'} "
                             f"{'>= 0' if allow_zero else '> 0'}{' or null' if allow_none else ''}, got {value!r}")
    if config.memoria_weight_form not in WEIGHT_FORMS:
        raise ValueError(f"{name_of}.memoria_weight_form must be one of {WEIGHT_FORMS}, got "
                         f"{config.memoria_weight_form!r}")
    for name in ("memoria_use_working_memory", "memoria_use_short_term", "memoria_use_long_term"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name_of}.{name} must be true or false, got {getattr(config, name)!r}")
    if config.memoria_ltm_search not in LTM_SEARCHES:
        raise ValueError(f"{name_of}.memoria_ltm_search must be one of {LTM_SEARCHES}, got "
                         f"{config.memoria_ltm_search!r}")
    if config.add_cross_attention:
        raise ValueError(f"{name_of}.add_cross_attention must be False: the memory attention is the model's own")
    W = config.memoria_num_memories
    if isinstance(W, bool) or not isinstance(W, int) or W < 1:
        raise ValueError(f"{name_of}.memoria_num_memories must be an integer > 0 (the Abstractor's slots), got {W!r}")
    if config.is_decoder:
        raise ValueError(f"{name_of}.is_decoder must be False: the model is an encoder")


def check_memory_layer_index(config) -> None:
    """The index must leave a layer above it (checked when the model is built: a config loaded from a checkpoint
    with fewer layers gets its index only after construction)."""
    index = config.memory_layer_index
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < config.num_hidden_layers - 1:
        raise ValueError(
            f"{type(config).__name__}.memory_layer_index must be an integer in [0, {config.num_hidden_layers - 2}] "
            f"(some layer must lie above it), got {index!r}"
        )


@dataclasses.dataclass(kw_only=True)
class EncoderMemoriaFields:
    """The Memoria fields both encoder configs add (MEMORIA_FIELDS_DOC), written once."""

    memory_layer_index: int = 9
    memoria_num_memories: int = 64
    memoria_lifespan_extend_scale: float | int = 8.0
    memoria_num_reminded_stm: int = 64
    memoria_num_reminded_ltm: int = 64
    memoria_stm_capacity: int = 128
    memoria_ltm_search_depth: int = 10
    memoria_initial_lifespan: float | int = 12
    memoria_reset_period: int = 500
    memoria_write_empty_segments: bool = False
    memoria_device: str | None = None
    memoria_weight_form: str = "exp"
    memoria_seed: int = 0
    memoria_deterministic: bool = False
    memoria_ltm_capacity: int | None = None
    memoria_cuda_graph: bool = True
    memoria_compile: bool = False
    memoria_fused_walk: bool = True
    memoria_use_working_memory: bool = True
    memoria_use_short_term: bool = True
    memoria_use_long_term: bool = True
    memoria_ltm_search: str = "hebbian"


@strict
class MemoriaBertConfig(BertConfig, EncoderMemoriaFields):
    """BertConfig plus Memoria's settings (EncoderMemoriaFields)."""

    model_type = BERT_KIND

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_encoder_memoria_config(self)


@strict
class MemoriaRobertaConfig(RobertaConfig, EncoderMemoriaFields):
    """RobertaConfig plus Memoria's settings (EncoderMemoriaFields)."""

    model_type = ROBERTA_KIND

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_encoder_memoria_config(self)


# ------------------------------------------------------------------------------------------------ memory attention
def memory_cross_attention(
    attention: BertAttention | RobertaAttention, hidden: torch.Tensor, source: MemorySource
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The HF cross-attention sub-layer `attention` (its `self` = query/key/value, `output` = dense, dropout and
    LayerNorm(x + hidden)) of `hidden` (B, T, H) over `source.values` (B, M, H), computed with its weights so that
    the probabilities can be read: the same arithmetic as transformers' eager/SDPA attention.

    Returns the new hidden states (B, T, H), equal to `hidden` for rows without memory (`source.row_scale` 0: the
    sub-layer is skipped there, as if absent), and, when `source.prob_weights` is set, the attention probabilities
    before dropout, averaged over heads and weighted queries, (B, M) detached.
    """
    core = attention.self
    B, T, H = hidden.shape
    M = source.values.shape[1]
    nh, hd = core.num_attention_heads, core.attention_head_size
    values = source.values.to(hidden.dtype)
    q = core.query(hidden).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    k = core.key(values).view(B, M, nh, hd).transpose(1, 2)  # (B, nh, M, hd)
    v = core.value(values).view(B, M, nh, hd).transpose(1, 2)  # (B, nh, M, hd)
    dropout_p = core.dropout.p if core.training else 0.0
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=source.attn_mask, dropout_p=dropout_p,
                                       scale=core.scaling)  # (B, nh, T, hd)
    probs = None
    if source.prob_weights is not None:
        with torch.no_grad():
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * core.scaling  # (B, nh, T, M)
            if source.attn_mask is not None:
                scores = scores.masked_fill(~source.attn_mask, -math.inf)
            p = torch.softmax(scores, dim=-1)  # before dropout (algorithm.md §e.1)
            probs = (p * source.prob_weights[:, None, :, None]).sum((1, 2))  # (B, M)
    y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
    out = attention.output(y, hidden)  # post-LN residual: LN(dropout(dense(y)) + hidden)
    out = torch.where(source.row_scale.bool(), out, hidden)  # rows without memory: no sub-layer
    return out, probs


class MemoryLayerMixin:
    """What a stock BERT / RoBERTa layer gains above `memory_layer_index`: `memory_attention` (created by the
    subclass) and a forward through the two memory paths between self-attention and the feed-forward."""

    memory_attention: nn.Module

    def forward_with_memory(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        working_memory: MemorySource | None,
        reminded: MemorySource,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, H) -> (B, T, H) and the reminded-attention probabilities (B, M) (None when M = 0).
        `working_memory` None: the working-memory path is ablated (memoria_use_working_memory=False)."""
        h, _ = self.attention(hidden_states, attention_mask)  # stock self-attention sub-layer
        if working_memory is not None:
            h, _ = memory_cross_attention(self.memory_attention, h, working_memory)
        probs = None
        if reminded.values.shape[1] > 0:
            h, probs = memory_cross_attention(self.memory_attention, h, reminded)
        h = apply_chunking_to_forward(self.feed_forward_chunk, self.chunk_size_feed_forward, self.seq_len_dim, h)
        return h, probs


class MemoriaBertLayer(MemoryLayerMixin, BertLayer):
    def __init__(self, config: MemoriaBertConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        # One module, its output LayerNorm included, for the WM and the reminded path.
        self.memory_attention = BertAttention(config, layer_idx=layer_idx, is_cross_attention=True)


class MemoriaRobertaLayer(MemoryLayerMixin, RobertaLayer):
    def __init__(self, config: MemoriaRobertaConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.memory_attention = RobertaAttention(config, layer_idx=layer_idx, is_cross_attention=True)


class MemoriaEncoder(nn.Module):
    """`layer` (the stock name): stock layers up to `memory_layer_index`, memory layers above it."""

    def __init__(self, config, stock_layer: type[nn.Module], memory_layer: type[nn.Module]):
        super().__init__()
        check_memory_layer_index(config)
        self.config = config
        self.layer = nn.ModuleList([
            (memory_layer if i > config.memory_layer_index else stock_layer)(config, layer_idx=i)
            for i in range(config.num_hidden_layers)
        ])


# ------------------------------------------------------------------------------------------------------- the trunk
class MemoriaEncoderModel(MemoryProtocol):
    """The shared trunk of both encoders (a mixin over the family's PreTrainedModel): holds the carried memory
    and runs one segment. Subclasses build `embeddings`, `encoder` (a MemoriaEncoder), `abstractor`, `pooler`."""

    memory_kind = "memoria_encoder"
    embeddings: nn.Module
    encoder: MemoriaEncoder
    abstractor: Abstractor

    def _init_memory_state(self) -> None:
        # Carried state: plain attributes (never parameters or buffers, never synchronised across ranks).
        self.memoria: Memoria | None = None  # built on first use, when the device and the DDP rank are known
        self.last_reminded_indices: torch.Tensor | None = None  # (B, M) of the last segment, for logging
        self.last_lifespan_delta: torch.Tensor | None = None  # (B, M)

    @property
    def max_segment_length(self) -> int:
        return self.config.max_position_embeddings

    def _new_memoria(self) -> Memoria:
        cfg = self.config
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        return Memoria(
            num_reminded_stm=cfg.memoria_num_reminded_stm,
            stm_capacity=cfg.memoria_stm_capacity,
            ltm_search_depth=cfg.memoria_ltm_search_depth,
            initial_lifespan=cfg.memoria_initial_lifespan,
            num_final_ltms=cfg.memoria_num_reminded_ltm,
            device=cfg.memoria_device,
            weight_form=cfg.memoria_weight_form,
            seed=cfg.memoria_seed + rank,
            deterministic=cfg.memoria_deterministic,
            ltm_capacity=cfg.memoria_ltm_capacity,
            static_shape=True,  # a fixed reminded width (masked): no host sync per segment
            validate=False,
            cuda_graph=cfg.memoria_cuda_graph,
            compile=cfg.memoria_compile,
            fused_walk=cfg.memoria_fused_walk,
            use_short_term=cfg.memoria_use_short_term,
            use_long_term=cfg.memoria_use_long_term,
            ltm_search=cfg.memoria_ltm_search,
        )

    # ---------------------------------------------------------------------------------------- memory protocol
    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        if rows is not None and (not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.dim() != 1):
            raise ValueError(f"reset_memory(rows=...) takes a bool tensor of shape (B,), got {rows!r}")
        if self.memoria is not None:
            self.memoria.reset_memory(rows=rows)
        self.last_reminded_indices = self.last_lifespan_delta = None

    def get_memory_state(self) -> dict[str, Any]:
        state = None if self.memoria is None else self.memoria.state_dict()
        return {"memory_kind": self.memory_kind, "memoria": _clone(state)}

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)
        if "memoria" not in state:
            raise ValueError("memory state lacks 'memoria'; pass what get_memory_state() returned")
        if state["memoria"] is None:
            self.memoria = None
        else:
            memoria = self._new_memoria()
            memoria.load_state_dict(state["memoria"])
            if self.config.memoria_device is None:
                memoria.to(self.embeddings.word_embeddings.weight.device)
            self.memoria = memoria
        self.last_reminded_indices = self.last_lifespan_delta = None

    def memory_stats(self) -> dict[str, float]:
        memoria = self.memoria
        if memoria is None or memoria.timestep == 0:
            return {"memory/working": 0.0, "memory/short_term": 0.0, "memory/long_term": 0.0}
        counts = memoria.type_counts().float().mean(0).tolist()
        return {
            "memory/working": counts[int(EngramType.WORKING)],
            "memory/short_term": counts[int(EngramType.SHORTTERM)],
            "memory/long_term": counts[int(EngramType.LONGTERM)],
        }

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        use_memory: bool = True,
        **kwargs,
    ) -> MemoryModelOutput:
        """One segment: input_ids (B, T), attention_mask (B, T) 1 = token. Returns `hidden_states` (B, T, H), the
        last layer's output (the heads read token 0).

        use_memory=False runs the stock encoder only (no Abstractor, no memory step, memory layers without their
        memory attention): exactly transformers' own BERT / RoBERTa with the same weights.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        cfg = self.config
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)  # (B, T, H) positions from 0
        mask = create_bidirectional_mask(config=cfg, inputs_embeds=h, attention_mask=attention_mask)

        tokens = attention_mask.to(torch.float32)  # (B, T)
        query_weights = tokens / tokens.sum(dim=1, keepdim=True).clamp(min=1.0)  # non-padding queries only
        working_memory = reminded = reminded_idx = reminded_valid = None
        layer_probs: list[torch.Tensor] = []
        for i, layer in enumerate(self.encoder.layer):
            if reminded is not None and isinstance(layer, MemoryLayerMixin):
                h, probs = layer.forward_with_memory(h, mask, working_memory, reminded)
                if probs is not None:
                    layer_probs.append(probs)  # (B, M)
            else:
                h = layer(h, mask)  # the stock layer (memory layers too when use_memory=False)
            if use_memory and i == cfg.memory_layer_index:
                # --- memory read: WM from the current segment after this layer (outside every layer)
                wm = self.abstractor(h)  # (B, W, H), with gradient
                write_rows = None if cfg.memoria_write_empty_segments else attention_mask.bool().any(dim=1)  # (B,)
                if self.memoria is None:
                    self.memoria = self._new_memoria()
                remembered, reminded_idx = self.memoria.add_and_remind(wm, mask=write_rows)  # (B,M,H), (B,M)
                reminded_idx = reminded_idx.to(h.device)
                reminded_valid = reminded_idx >= 0  # (B, M)
                all_rows = torch.ones(B, dtype=torch.bool, device=h.device)
                if cfg.memoria_use_working_memory:  # else the WM is only written to memory
                    working_memory = memory_source(wm, None, all_rows)
                reminded = memory_source(remembered.to(device=h.device, dtype=h.dtype), reminded_valid,
                                         reminded_valid.any(dim=1), query_weights, cfg.num_attention_heads)

        # --- memory write: Δ from the reminded attention of the memory layers
        if reminded_idx is not None:
            if layer_probs:
                mean_probs = torch.stack(layer_probs).float().mean(0)  # (B, M) over layers
                delta = lifespan_delta(mean_probs, reminded_valid, cfg.memoria_lifespan_extend_scale)
            else:  # M = 0
                delta = torch.zeros(reminded_idx.shape, device=h.device, dtype=torch.float32)
            self.memoria.adjust_lifespan_and_memories(reminded_idx, delta)
            self.last_reminded_indices, self.last_lifespan_delta = reminded_idx, delta
        return MemoryModelOutput(hidden_states=h, aux_loss=h.new_zeros(()))


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class NewParametersMixin:
    """`from_pretrained` that records (and logs) which parameters the checkpoint did not hold: the memory parts
    when loading a plain BERT / RoBERTa checkpoint."""

    new_parameters: list[str] = []  # noqa: RUF012

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model.new_parameters = sorted(info["missing_keys"])
        if model.new_parameters:
            log.info("%s: %d tensors not in the checkpoint, initialised fresh: %s", cls.__name__,
                     len(model.new_parameters), ", ".join(model.new_parameters))
        return (model, info) if want_info else model


def _init_abstractor(module: nn.Module, std: float) -> None:
    if isinstance(module, Abstractor):
        for param in module.parameters(recurse=False):  # its query slots; its Linears get the generic init
            init.normal_(param, mean=0.0, std=std)


# ------------------------------------------------------------------------------------------------------------ BERT
class MemoriaBertPreTrainedModel(NewParametersMixin, BertPreTrainedModel):
    config_class = MemoriaBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["BertEmbeddings", "BertLayer", "MemoriaBertLayer"]  # noqa: RUF012
    _can_record_outputs = {}  # noqa: RUF012  (forward returns MemoryModelOutput)

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_abstractor(module, self.config.initializer_range)


class MemoriaBertModel(MemoriaEncoderModel, MemoriaBertPreTrainedModel):
    """BERT trunk with Memoria; `pooler` as BertModel's."""

    memory_kind = BERT_KIND

    def __init__(self, config: MemoriaBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = MemoriaEncoder(config, BertLayer, MemoriaBertLayer)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.abstractor = Abstractor(config.memoria_num_memories, config.hidden_size, config.intermediate_size)
        self._init_memory_state()
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value


class MemoriaBertForSequenceClassification(MemoriaBertPreTrainedModel, MemoryOfBaseModel):
    """BertForSequenceClassification's head (pooler on token 0 → dropout → linear) on the Memoria trunk."""

    memory_kind = BERT_KIND
    memory_base = "bert"

    def __init__(self, config: MemoriaBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = MemoriaBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_memory: bool = True, **kwargs) -> MemoryModelOutput:
        """One segment (B, T) -> logits (B, num_labels); loss = mean CE when `labels` (B,) are given."""
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                        use_memory=use_memory)
        pooled = self.bert.pooler(out.hidden_states)  # (B, H) tanh(dense(token 0))
        logits = self.classifier(self.dropout(pooled))  # (B, C)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return MemoryModelOutput(loss=loss, logits=logits, aux_loss=out.aux_loss, hidden_states=out.hidden_states)


# --------------------------------------------------------------------------------------------------------- RoBERTa
class MemoriaRobertaPreTrainedModel(NewParametersMixin, RobertaPreTrainedModel):
    config_class = MemoriaRobertaConfig
    base_model_prefix = "roberta"
    _no_split_modules = ["RobertaEmbeddings", "RobertaLayer", "MemoriaRobertaLayer"]  # noqa: RUF012
    _can_record_outputs = {}  # noqa: RUF012

    def _init_weights(self, module):
        super()._init_weights(module)
        _init_abstractor(module, self.config.initializer_range)


class MemoriaRobertaModel(MemoriaEncoderModel, MemoriaRobertaPreTrainedModel):
    """RoBERTa trunk with Memoria (RoBERTa embeddings: positions from pad_token_id + 1, padding keeps its own)."""

    memory_kind = ROBERTA_KIND

    def __init__(self, config: MemoriaRobertaConfig, add_pooling_layer: bool = False):
        super().__init__(config)
        self.embeddings = RobertaEmbeddings(config)
        self.encoder = MemoriaEncoder(config, RobertaLayer, MemoriaRobertaLayer)
        self.pooler = None  # RoBERTa's classifier reads token 0 itself
        self.abstractor = Abstractor(config.memoria_num_memories, config.hidden_size, config.intermediate_size)
        self._init_memory_state()
        self.post_init()

    @property
    def max_segment_length(self) -> int:
        return self.config.max_position_embeddings - self.config.pad_token_id - 1  # 514 - 2 = 512

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value


class MemoriaRobertaForSequenceClassification(MemoriaRobertaPreTrainedModel, MemoryOfBaseModel):
    """RobertaForSequenceClassification's head (dense, tanh, out_proj on token 0) on the Memoria trunk."""

    memory_kind = ROBERTA_KIND
    memory_base = "roberta"

    def __init__(self, config: MemoriaRobertaConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.roberta = MemoriaRobertaModel(config)
        self.classifier = RobertaClassificationHead(config)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                use_memory: bool = True, **kwargs) -> MemoryModelOutput:
        """One segment (B, T) -> logits (B, num_labels); loss = mean CE when `labels` (B,) are given."""
        out = self.roberta(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           use_memory=use_memory)
        logits = self.classifier(out.hidden_states)  # (B, C) from token 0
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return MemoryModelOutput(loss=loss, logits=logits, aux_loss=out.aux_loss, hidden_states=out.hidden_states)


AutoConfig.register(BERT_KIND, MemoriaBertConfig, exist_ok=True)
AutoModel.register(MemoriaBertConfig, MemoriaBertModel, exist_ok=True)
AutoModelForSequenceClassification.register(MemoriaBertConfig, MemoriaBertForSequenceClassification, exist_ok=True)
AutoConfig.register(ROBERTA_KIND, MemoriaRobertaConfig, exist_ok=True)
AutoModel.register(MemoriaRobertaConfig, MemoriaRobertaModel, exist_ok=True)
AutoModelForSequenceClassification.register(MemoriaRobertaConfig, MemoriaRobertaForSequenceClassification,
                                            exist_ok=True)
