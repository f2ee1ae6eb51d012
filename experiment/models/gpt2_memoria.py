"""GPT-2 with Memoria: the paper's Memoria Transformer (reference model type `gpt2_with_memoria`).

A stock pre-LN GPT-2 (transformers' own attention, MLP and block) where every block gains two cross-attention
sub-layers that share one attention module:

    h += SelfAttn(LN1 h)                      causal, as in GPT-2
    h += MemAttn(LN_wm h;  kv = working memory)   the Abstractor's summary of the previous segment
    h += MemAttn(LN_mem h; kv = reminded memory)  engrams Memoria recalled for this segment
    h += MLP(LN2 h)

One forward call is one segment. The model carries its memory (a `memoria.Memoria` and the previous segment's
final hidden states) from one call to the next; see `GPT2WithMemoriaModel.forward` for the exact step.
Parameter names match stock GPT-2, so a `GPT2LMHeadModel` checkpoint loads with only the memory parts (memory
attention, its two LayerNorms, the Abstractor) freshly initialised.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config
from transformers import initialization as init
from transformers.masking_utils import create_causal_mask
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention, GPT2Block, GPT2PreTrainedModel
from transformers.pytorch_utils import Conv1D

from memoria import Abstractor, EngramType, Memoria
from memoria.memoria import LTM_SEARCHES

from .gpt2 import causal_lm_loss
from .protocol import MemoryModelOutput, MemoryOfBaseModel, MemoryProtocol

MEMORY_KIND = "gpt2_with_memoria"
WEIGHT_FORMS = ("exp", "neg_sq")


@strict
class GPT2WithMemoriaConfig(GPT2Config):
    """GPT2Config plus Memoria's settings (defaults: the paper's WikiText-103 / PG-19 model).

    memoria_num_memories          W, working-memory engrams per segment (Abstractor slots); 0/None = the
                                  previous segment's hidden states themselves are the working memory
    memoria_lifespan_extend_scale alpha: a reminded engram attended uniformly gains about alpha lifespan
    memoria_num_reminded_stm      short-term memories recalled per segment
    memoria_num_reminded_ltm      long-term memories recalled per segment
    memoria_stm_capacity          short-term memories kept per row before the oldest move to long-term memory
    memoria_ltm_search_depth      hops of the greedy walk over the Hebbian graph
    memoria_initial_lifespan      lifespan of a new engram (segments)
    memoria_reset_period          training steps between memory resets (read by the task)
    memoria_device                where the memory lives; None = the model's device
    memoria_weight_form           "exp" (paper's runs) or "neg_sq" (reference 1.1.0)
    memoria_seed                  seed of the memory's tie-break hash (the rank is added under DDP)
    memoria_deterministic         break ties oldest-first instead of at random
    memoria_ltm_capacity          cap on long-term memories per row; None = unbounded, as in the paper
    memoria_cuda_graph            on a GPU, replay the memory step's device work as CUDA graphs (same results;
                                  on by default, ignored off a GPU)
    memoria_compile               torch.compile the memory step's device work (same results; slow first step)
    memoria_fused_walk            on a GPU with Triton, the memory's graph walk as one Triton kernel (same results;
                                  on by default, ignored off a GPU)
    memoria_zero_init_memory_output  start the memory cross-attention's output projection at zero, so the memory
                                  paths add nothing at initialisation (not the paper's model: an option for the
                                  sorting stall of docs/results.md)

    Ablations (experiments.md §e.5; the defaults are the paper's model):
    memoria_use_working_memory    False: no block attends to the working memory (its cross-attention path and
                                  ln_wm go unused); the WM is still written to Memoria, so STM and LTM still fill
    memoria_use_short_term        False: Memoria returns no short-term engrams (they still seed the LTM search)
    memoria_use_long_term         False: Memoria returns no long-term engrams
    memoria_ltm_search            how Memoria finds LTM candidates: "hebbian" (the walk), "random" (as many as the
                                  walk could visit), "random_matched" (as many as it found) or "exhaustive"
    """

    model_type = MEMORY_KIND

    memoria_num_memories: int | None = 50
    memoria_lifespan_extend_scale: float | int = 8.0
    memoria_num_reminded_stm: int = 50
    memoria_num_reminded_ltm: int = 50
    memoria_stm_capacity: int = 400
    memoria_ltm_search_depth: int = 10
    memoria_initial_lifespan: float | int = 9
    memoria_reset_period: int = 500
    memoria_device: str | None = None
    memoria_weight_form: str = "exp"
    memoria_seed: int = 0
    memoria_deterministic: bool = False
    memoria_ltm_capacity: int | None = None
    memoria_cuda_graph: bool = True
    memoria_compile: bool = False
    memoria_fused_walk: bool = True
    memoria_zero_init_memory_output: bool = False
    memoria_use_working_memory: bool = True
    memoria_use_short_term: bool = True
    memoria_use_long_term: bool = True
    memoria_ltm_search: str = "hebbian"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        # Plain ValueErrors at construction (the strict class validators would wrap them in another type).
        check_memoria_config(self)


def check_memoria_config(config: GPT2WithMemoriaConfig) -> None:
    """Raise ValueError naming the bad Memoria setting and what it must be."""

    def positive(name: str, allow_zero: bool = False, allow_none: bool = False, integer: bool = True) -> None:
        value = getattr(config, name)
        if value is None and allow_none:
            return
        ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
        if (
            isinstance(value, bool)
            or not ok_type
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not allow_zero)
        ):
            kind = "an integer" if integer else "a number"
            bound = ">= 0" if allow_zero else "> 0"
            none = " or null" if allow_none else ""
            raise ValueError(f"{type(config).__name__}.{name} must be {kind} {bound}{none}, got {value!r}")

    positive("memoria_num_memories", allow_zero=True, allow_none=True)
    positive("memoria_lifespan_extend_scale", allow_zero=True, integer=False)
    positive("memoria_num_reminded_stm", allow_zero=True)
    positive("memoria_num_reminded_ltm", allow_zero=True)
    positive("memoria_stm_capacity")
    positive("memoria_ltm_search_depth", allow_zero=True)
    positive("memoria_initial_lifespan", integer=False)
    positive("memoria_reset_period")
    positive("memoria_ltm_capacity", allow_none=True)
    if config.memoria_weight_form not in WEIGHT_FORMS:
        raise ValueError(
            f"{type(config).__name__}.memoria_weight_form must be one of {WEIGHT_FORMS}, "
            f"got {config.memoria_weight_form!r}"
        )
    for name in ("memoria_use_working_memory", "memoria_use_short_term", "memoria_use_long_term"):
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{type(config).__name__}.{name} must be true or false, got {getattr(config, name)!r}")
    if config.memoria_ltm_search not in LTM_SEARCHES:
        raise ValueError(
            f"{type(config).__name__}.memoria_ltm_search must be one of {LTM_SEARCHES}, "
            f"got {config.memoria_ltm_search!r}"
        )
    if config.add_cross_attention:
        raise ValueError(
            f"{type(config).__name__}.add_cross_attention must be False: "
            "the memory attention is the model's cross-attention"
        )


class MemorySource(NamedTuple):
    """One memory the blocks attend to, prepared once per segment and shared by every block (built by
    `memory_source`): what does not change from block to block is computed once, not twelve times."""

    values: torch.Tensor  # (B, M, H) the engrams
    attn_mask: torch.Tensor | None  # (B, 1, 1, M) bool, True = visible; None = every slot is visible
    row_scale: torch.Tensor  # (B, 1, 1) float32: 1 for a row with memory, 0 for one without
    prob_weights: torch.Tensor | None  # (B, T) float32 query weights x row / heads (for Δ); None = no probs


def memory_source(
    memory: torch.Tensor,
    memory_valid: torch.Tensor | None,
    row_valid: torch.Tensor,
    query_weights: torch.Tensor | None = None,
    num_heads: int = 1,
) -> MemorySource:
    """Prepare `memory` (B, M, H) for `memory_attention`.

    memory_valid: (B, M) bool, False slots (Memoria's -1) get no attention; None = all visible.
    row_valid: (B,) bool; a row without memory gets exactly zero output (the output bias included).
    query_weights: (B, T), rows summing to 1: ask for the attention probabilities averaged over heads and these
        weighted queries (for the lifespan delta); None = no probabilities.
    """
    mask = None  # no causality across segments: every valid slot is visible to every query
    if memory_valid is not None:
        # A row with no valid slot sees all of them (finite, never NaN) and is zeroed by row_scale.
        mask = (memory_valid | ~row_valid[:, None])[:, None, None, :]  # (B, 1, 1, M)
    prob_weights = None
    if query_weights is not None:
        prob_weights = query_weights.float() * (row_valid[:, None] / num_heads)  # (B, T)
    return MemorySource(memory, mask, row_valid[:, None, None].float(), prob_weights)


def memory_keys_values(
    attn: GPT2Attention, kv: torch.Tensor, sizes: list[int]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split `kv` = `attn.c_attn(values)` (B, sum M_i, 2H), the projection of memories laid side by side in
    `values` (B, sum M_i, H), `sizes` = the M_i, into each memory's keys and values (B, nh, M_i, hd) (views, no
    copy; the same rows as projecting each memory alone)."""
    B, M, _ = kv.shape
    nh, hd = attn.num_heads, attn.head_dim
    k, v = kv.split(attn.split_size, dim=2)  # (B, M, H) each
    k = k.view(B, M, nh, hd).transpose(1, 2)  # (B, nh, M, hd)
    v = v.view(B, M, nh, hd).transpose(1, 2)  # (B, nh, M, hd)
    return list(zip(k.split(sizes, dim=2), v.split(sizes, dim=2)))


class StackedProjection(NamedTuple):
    """Every block's memory key/value projection (`block.memory_attn.c_attn`) stacked for one batched GEMM per
    memory (built by `stack_memory_projections`, applied by `project_memory`)."""

    weight: torch.Tensor  # (L, H, 2H) the blocks' c_attn weights (in autocast's dtype under autocast)
    bias: torch.Tensor  # (L, 1, 2H)
    num_heads: int
    head_dim: int


def is_stock_conv1d(module: nn.Module) -> bool:
    """Whether `module` is a plain Conv1D whose weight and bias may be applied directly: no hooks, no forward of its
    own (an adapter, a probe, accelerate's device hooks)."""
    return type(module) is Conv1D and not (module._forward_hooks or module._forward_pre_hooks
                                           or "forward" in vars(module))


def stackable_memory_projections(blocks: nn.ModuleList, device: torch.device) -> bool:
    """Whether `stack_memory_projections` may stand in for the blocks' memory key/value projections: not when a
    c_attn is not `is_stock_conv1d`, the blocks' weights are not all on `device` (the memories' device) in one
    dtype (blocks spread over devices), or the blocks' attentions differ in heads: each block then projects
    through its own module."""
    projections = [block.memory_attn.c_attn for block in blocks]
    if not all(map(is_stock_conv1d, projections)):
        return False
    placement = {(p.weight.device, p.weight.dtype, p.bias.device, p.bias.dtype) for p in projections}
    heads = {(block.memory_attn.num_heads, block.memory_attn.head_dim) for block in blocks}
    return len(placement) == 1 and len(heads) == 1 and projections[0].weight.device == device


def stack_memory_projections(weights: list[torch.Tensor], biases: list[torch.Tensor], num_heads: int
                             ) -> StackedProjection:
    """The blocks' memory key/value projections (their c_attn weights (H, 2H) and biases (2H,), in block order)
    stacked for `project_memory`; `stackable_memory_projections` says when this stands in for the modules."""
    weight = torch.stack(weights)  # (L, H, 2H)
    bias = torch.stack(biases)[:, None, :]  # (L, 1, 2H)
    device_type = weight.device.type
    if torch.is_autocast_enabled(device_type):  # cast once, before expanding (autocast would copy expanded rows)
        dtype = torch.get_autocast_dtype(device_type)
        weight, bias = weight.to(dtype), bias.to(dtype)
    return StackedProjection(weight, bias, num_heads, weight.shape[-1] // 2 // num_heads)


def project_memory(stacked: StackedProjection, values: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every block's keys and values of the memory `values` (B, M, H): result[block] = (keys, values), each
    (B, nh, M, hd) and contiguous, those of `block.memory_attn.c_attn(values)` laid out heads-major.

    The memories are the same for every block (they do not depend on the hidden states), so the L small
    projections of a memory (B*M x H x 2H each; forward and both backward GEMMs fill well under one wave of a
    large GPU) run as one batched GEMM, forward and for each gradient. Projecting each memory on its own keeps the
    reminded engrams, which carry no gradient (Memoria stores detached data), free of an input-gradient GEMM:
    only the working memory's rows have one. The keys and values are then laid out heads-major for every block in
    one copy (and their gradients laid back in one copy): the attention's batched matmuls over (batch, head) need
    that layout, and inside compiled blocks each block would otherwise copy its own (four small copies a block
    forward and as many backward, instead of one large one per memory). Same products, same parameters: the
    weights are stacked for the call and their gradients land in each block's c_attn.
    """
    weight, bias, nh, hd = stacked
    L = weight.shape[0]
    B, M, H = values.shape
    if torch.is_autocast_enabled(weight.device.type):
        values = values.to(weight.dtype)
    rows = values.reshape(1, B * M, H).expand(L, B * M, H)  # the same rows for every block, not copied
    kv = torch.baddbmm(bias, rows, weight)  # (L, B*M, 2H): keys then values, each heads side by side
    kv = kv.view(L, B, M, 2, nh, hd).permute(3, 0, 1, 4, 2, 5).contiguous()  # (2, L, B, nh, M, hd)
    return list(zip(kv[0].unbind(0), kv[1].unbind(0)))  # L x (keys, values) (B, nh, M, hd)


def project_memories(weights: list[torch.Tensor], biases: list[torch.Tensor], num_heads: int,
                     memories: list[torch.Tensor]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Every block's keys and values of each of `memories` (B, M_i, H), given the blocks' memory projections
    (`memory_projection_parameters`): result[block][memory] = (keys, values), each (B, nh, M_i, hd) and contiguous
    (`project_memory` of each memory, with the projections stacked once)."""
    stacked = stack_memory_projections(weights, biases, num_heads)
    per_memory = [project_memory(stacked, values) for values in memories]
    return [list(block_kv) for block_kv in zip(*per_memory)]


def stacked_memory_projections(
    blocks: nn.ModuleList, memories: list[torch.Tensor]
) -> list[list[tuple[torch.Tensor, torch.Tensor]]] | None:
    """`project_memories` with the projections of `blocks`, or None where `stackable_memory_projections` says no."""
    if not stackable_memory_projections(blocks, memories[0].device):
        return None
    return project_memories(*memory_projection_parameters(blocks), blocks[0].memory_attn.num_heads, memories)


def memory_projection_parameters(blocks: nn.ModuleList) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The blocks' memory key/value projection weights and biases, in block order."""
    return [b.memory_attn.c_attn.weight for b in blocks], [b.memory_attn.c_attn.bias for b in blocks]


class MemoryReader(nn.Module):
    """What the blocks read of the two memories, prepared once per segment: both `MemorySource`s and, given the
    blocks' memory projections (stackable ones), every block's keys and values of each memory (`project_memories`).

    No parameters of its own (the projections come in as arguments), so no state-dict keys. A module so that
    `compile_blocks` compiles it with the blocks: replayed as CUDA graphs (mode=reduce-overhead), a block takes
    the outputs of an earlier graph as they are, while every tensor made outside a graph is copied into each
    block's graph inputs, every step: eight a block here (keys and values of both memories, their masks and
    scales), 96 copy kernels a step for GPT-2 small, where compiled they are one graph's outputs.
    """

    # Compiled, every cat of the graph as one kernel: the stacks of the blocks' 12 weights and 12 biases, and
    # backward of the 48 keys' and values' gradients, would otherwise be one copy kernel per tensor (inductor's
    # ConcatKernel past 8 inputs): 72 launches a step where this makes 6.
    inductor_options = {"force_pointwise_cat": True}  # noqa: RUF012  (read by compile_blocks)

    def __init__(self, num_heads: int, use_working_memory: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.use_working_memory = use_working_memory  # False: the blocks get no working memory (the ablation)

    def forward(
        self,
        wm: torch.Tensor,
        wm_rows: torch.Tensor,
        remembered: torch.Tensor,
        reminded_valid: torch.Tensor,
        query_weights: torch.Tensor,
        projection_weights: list[torch.Tensor] | None = None,
        projection_biases: list[torch.Tensor] | None = None,
    ) -> tuple[MemorySource, MemorySource, list[list[tuple[torch.Tensor, torch.Tensor]]] | None]:
        """wm (B, W, H) the working memory, wm_rows (B,) bool its real rows; remembered (B, M, H) the reminded
        engrams, reminded_valid (B, M) bool their real slots; query_weights (B, T) (see `memory_source`).
        projection_weights / _biases: the blocks' memory c_attn parameters (`memory_projection_parameters`),
        None = each block projects the memories itself.

        Returns the working memory's (None without `use_working_memory`) and the reminded memory's `MemorySource`,
        and [block][memory] (keys, values) (B, nh, M_i, hd) for the memories with slots, working memory first
        (`present_memories`' order), or None.
        """
        working_memory = memory_source(wm, None, wm_rows) if self.use_working_memory else None
        reminded = memory_source(remembered, reminded_valid, reminded_valid.any(dim=1), query_weights,
                                 self.num_heads)
        present = [src.values for src in present_memories(working_memory, reminded)]
        if projection_weights is None or not present:
            return working_memory, reminded, None
        return working_memory, reminded, project_memories(projection_weights, projection_biases, self.num_heads,
                                                          present)


def memory_attention(
    attn: GPT2Attention,
    hidden: torch.Tensor,
    source: MemorySource,
    keys_values: tuple[torch.Tensor, torch.Tensor] | None = None,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cross-attention of `hidden` (B, T, H) over `source.values` (B, M, H) with a GPT-2 cross-attention module.

    keys_values: the source's keys and values (B, nh, M, hd) when already projected (`memory_keys_values`);
    None = project `source.values` here.
    fused: True = the fused `scaled_dot_product_attention` kernel (one kernel forward, one backward: what an eager
    step wants); False = the same attention written out (matmul, softmax, dropout, matmul), whose softmax also
    gives the probabilities, for inductor to fuse around two small matmuls. None = written out while
    torch.compile traces a float32 block, fused otherwise: in float32 SDPA has only its memory-efficient kernel,
    slower than the written-out attention at a few dozen memory slots (on an H100, backward 0.7 ms less per
    training step), while in bf16 it has flash kernels (and the written-out path measured no better there;
    docs/benchmarks.md).
    Returns the output (B, T, H), and when `source.prob_weights` is set the attention probabilities taken before
    attention dropout and outside autograd, averaged over heads and weighted queries: (B, M), zero for rows
    without memory.
    """
    B, T, H = hidden.shape
    nh, hd = attn.num_heads, attn.head_dim
    q = attn.q_attn(hidden).view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
    if keys_values is None:
        [keys_values] = memory_keys_values(attn, attn.c_attn(source.values), [source.values.shape[1]])
    k, v = keys_values  # (B, nh, M, hd) each
    dropout_p = attn.attn_dropout.p if attn.training else 0.0
    if fused is None:
        fused = not (torch.compiler.is_compiling() and q.dtype == torch.float32)

    probs = None
    if fused:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=source.attn_mask, dropout_p=dropout_p,
                                           scale=attn.scaling)  # (B, nh, T, hd)
        if source.prob_weights is not None:
            with torch.no_grad():
                probs = _softmax_over_slots(torch.matmul(q, k.transpose(-1, -2)), source, attn.scaling)
    else:
        p = _softmax_over_slots(torch.matmul(q, k.transpose(-1, -2)), source, attn.scaling)  # (B, nh, T, M)
        if source.prob_weights is not None:
            probs = p.detach()
        y = torch.matmul(F.dropout(p, dropout_p, training=dropout_p > 0).to(v.dtype), v)  # (B, nh, T, hd)
    if probs is not None:
        probs = (probs * source.prob_weights[:, None, :, None]).sum((1, 2))  # (B, M) mean over heads, queries

    y = y.transpose(1, 2).reshape(B, T, H)  # (B, T, H)
    y = attn.resid_dropout(attn.c_proj(y))
    return y * source.row_scale.to(y.dtype), probs  # (B, T, H): a no-op cast unless under autocast


def _softmax_over_slots(scores: torch.Tensor, source: MemorySource, scale: float) -> torch.Tensor:
    """softmax(scale * scores) (B, nh, T, M) over the visible slots of `source`, in float32."""
    scores = scores.float() * scale
    if source.attn_mask is not None:
        scores = scores.masked_fill(~source.attn_mask, -math.inf)  # masked slots get no attention
    return torch.softmax(scores, dim=-1)


class GPT2WithMemoriaBlock(GPT2Block):
    """A stock GPT2Block (ln_1, attn, ln_2, mlp) plus one shared memory cross-attention with its own two
    LayerNorms."""

    def __init__(self, config: GPT2WithMemoriaConfig, layer_idx: int | None = None):
        super().__init__(config, layer_idx=layer_idx)
        self.ln_wm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.ln_mem = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        # One module for both memory paths (shared weights), as in the paper's model.
        self.memory_attn = GPT2Attention(config=config, is_cross_attention=True, layer_idx=layer_idx)
        self.memory_attn.c_proj.is_memory_output = True  # for memoria_zero_init_memory_output in _init_weights

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        working_memory: MemorySource | None = None,
        reminded: MemorySource | None = None,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden_states (B, T, H); the working memory (W engrams) and the reminded memory (M engrams, with
        `prob_weights`) as prepared by `memory_source`, each None when absent (or M = 0). memory_kv: this
        block's memory keys and values of each present memory, (B, nh, W, hd) twice and (B, nh, M, hd) twice,
        projected by the model for every block at once (`project_memory`); None = projected here.

        Returns the new hidden states and this layer's reminded-attention probabilities averaged over heads
        and query positions, (B, M) detached, or None without reminded memory.
        """
        h = hidden_states
        attn_out, _ = self.attn(self.ln_1(h), attention_mask=attention_mask, **kwargs)
        h = h + attn_out

        reminded_probs = None
        sources = present_memories(working_memory, reminded)
        if sources:
            if memory_kv is None:  # both memories in one projection (the shared module's c_attn), in source order
                joint_kv = self.memory_attn.c_attn(joint_memory_values(working_memory, reminded))
                memory_kv = memory_keys_values(self.memory_attn, joint_kv, [src.values.shape[1] for src in sources])
            for source, keys_values in zip(sources, memory_kv):
                if source is working_memory:
                    wm_out, _ = memory_attention(self.memory_attn, self.ln_wm(h), source, keys_values)
                    h = h + wm_out
                else:
                    mem_out, reminded_probs = memory_attention(self.memory_attn, self.ln_mem(h), source, keys_values)
                    h = h + mem_out  # reminded_probs (B, M): mean over heads and (weighted) queries

        h = h + self.mlp(self.ln_2(h))
        return h, reminded_probs


def present_memories(working_memory: MemorySource | None, reminded: MemorySource | None) -> list[MemorySource]:
    """The memories a block attends to, in order: the working memory, then the reminded one if it has slots."""
    return [src for src in (working_memory, reminded) if src is not None and src.values.shape[1] > 0]


def joint_memory_values(working_memory: MemorySource | None, reminded: MemorySource | None) -> torch.Tensor | None:
    """The values of `present_memories` side by side, (B, W + M, H) (None without memory): what a block's memory
    attention projects to keys and values in one GEMM when the model has not projected them for it."""
    sources = present_memories(working_memory, reminded)
    if not sources:
        return None
    return sources[0].values if len(sources) == 1 else torch.cat([src.values for src in sources], dim=1)


def _clone_tensors(value: Any) -> Any:
    """A copy of nested dicts / lists / tuples with every tensor cloned (nothing aliases live state)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_tensors(v) for v in value)
    return value


def lifespan_delta(mean_probs: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """The lifespan gain of each reminded engram: Δ = ā · M_b · α (algorithm.md §e.1).

    mean_probs: (B, M) reminded-attention probabilities averaged over layers, heads and query positions.
    valid: (B, M) bool. M_b is the number of valid engrams of row b, so uniform attention gives exactly α
    each and Δ does not depend on how wide the padded tensor is. Invalid slots get 0.
    """
    valid_count = valid.sum(dim=1, keepdim=True).to(mean_probs.dtype)  # (B, 1)
    return mean_probs * valid_count * scale * valid.to(mean_probs.dtype)  # (B, M)


class GPT2WithMemoriaPreTrainedModel(GPT2PreTrainedModel):
    # Set explicitly: annotations are strings under `from __future__ import annotations`.
    config_class = GPT2WithMemoriaConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["GPT2WithMemoriaBlock"]  # noqa: RUF012  (transformers class-attribute convention)
    # compile_blocks compiles these too: what makes the blocks' memory inputs, so that under CUDA graphs the blocks
    # take them as an earlier graph's outputs (see MemoryReader), and the working memory's Abstractor, whose dozen
    # small ops would otherwise be launched one by one before the memory step, where the GPU has nothing else to do
    _compile_with_blocks = ("MemoryReader", "Abstractor")
    _can_record_outputs = {}  # noqa: RUF012  (no output recording: forward returns MemoryModelOutput)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Abstractor):
            # The Abstractor's own parameters (its query slots) N(0, std); its Linear layers get the generic
            # N(0, std) / zero-bias init above (algorithm.md §b.3).
            for param in module.parameters(recurse=False):
                init.normal_(param, mean=0.0, std=self.config.initializer_range)
        if getattr(module, "is_memory_output", False) and self.config.memoria_zero_init_memory_output:
            init.zeros_(module.weight)  # the memory cross-attention's output projection (marked by the block)
            init.zeros_(module.bias)


class GPT2WithMemoriaModel(GPT2WithMemoriaPreTrainedModel, MemoryProtocol):
    """The GPT-2 trunk with Memoria. Holds the carried memory; `forward` runs one segment."""

    memory_kind = MEMORY_KIND

    def __init__(self, config: GPT2WithMemoriaConfig):
        super().__init__(config)
        check_memoria_config(config)
        self.embed_dim = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, self.embed_dim)
        self.wpe = nn.Embedding(config.max_position_embeddings, self.embed_dim)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(
            [GPT2WithMemoriaBlock(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        self.ln_f = nn.LayerNorm(self.embed_dim, eps=config.layer_norm_epsilon)
        self.memory_reader = MemoryReader(config.num_attention_heads, config.memoria_use_working_memory)
        if config.memoria_num_memories:
            self.abstractor = Abstractor(config.memoria_num_memories, self.embed_dim, 4 * self.embed_dim)
        else:
            self.abstractor = None  # the previous segment's hidden states are the working memory
        self.gradient_checkpointing = False

        # Carried state: plain attributes (never parameters or buffers, never synchronised across ranks).
        self.memoria: Memoria | None = None  # built on first use, when the device and the DDP rank are known
        self.prev_hidden: torch.Tensor | None = None  # (B, T, H) previous segment's ln_f output, detached
        self.prev_hidden_rows: torch.Tensor | None = None  # (B,) bool: rows whose prev_hidden is real
        # The last segment's reminded indices and lifespan deltas (B, M), for logging and analysis.
        self.last_reminded_indices: torch.Tensor | None = None
        self.last_lifespan_delta: torch.Tensor | None = None
        self._state_is_inference = False  # carried state last written under torch.inference_mode

        self.post_init()

    def get_input_embeddings(self):
        return self.wte

    def set_input_embeddings(self, new_embeddings):
        self.wte = new_embeddings

    @property
    def max_segment_length(self) -> int:
        return self.config.n_positions

    # ------------------------------------------------------------------ memory protocol
    def _new_memoria(self) -> Memoria:
        cfg = self.config
        rank = (
            torch.distributed.get_rank()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 0
        )
        return Memoria(
            num_reminded_stm=cfg.memoria_num_reminded_stm,
            stm_capacity=cfg.memoria_stm_capacity,
            ltm_search_depth=cfg.memoria_ltm_search_depth,
            initial_lifespan=cfg.memoria_initial_lifespan,
            num_final_ltms=cfg.memoria_num_reminded_ltm,
            device=cfg.memoria_device,
            weight_form=cfg.memoria_weight_form,
            seed=cfg.memoria_seed + rank,  # each rank's streams break ties independently
            deterministic=cfg.memoria_deterministic,
            ltm_capacity=cfg.memoria_ltm_capacity,
            # the fast path: a fixed reminded width (masked) and no value checks, so a step makes no host sync
            static_shape=True,
            validate=False,
            cuda_graph=cfg.memoria_cuda_graph,
            compile=cfg.memoria_compile,
            fused_walk=cfg.memoria_fused_walk,
            use_short_term=cfg.memoria_use_short_term,
            use_long_term=cfg.memoria_use_long_term,
            ltm_search=cfg.memoria_ltm_search,
        )

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        if rows is None:
            if self.memoria is not None:
                self.memoria.reset_memory()
            self.prev_hidden = self.prev_hidden_rows = None
            self.last_reminded_indices = self.last_lifespan_delta = None
            return
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.dim() != 1:
            raise ValueError(f"reset_memory(rows=...) takes a bool tensor of shape (B,), got {rows!r}")
        if self.prev_hidden is None:
            return  # nothing carried: every row is already fresh
        if rows.shape[0] != self.prev_hidden.shape[0]:
            raise ValueError(
                f"reset_memory got {rows.shape[0]} rows but the memory holds {self.prev_hidden.shape[0]}; "
                "pass a (B,) mask of the current batch size"
            )
        rows = rows.to(self.prev_hidden.device)
        keep = self.prev_hidden_rows & ~rows  # (B,)
        if not bool(keep.any()):
            self.reset_memory()  # every row forgotten: the same as a full reset
            return
        if self.memoria is not None:
            self.memoria.reset_memory(rows=rows)
        self.prev_hidden = self.prev_hidden.masked_fill(rows[:, None, None], 0.0)
        self.prev_hidden_rows = keep
        self._state_is_inference |= torch.is_inference_mode_enabled()

    def _move_memory(self, device: torch.device) -> None:
        self.prev_hidden = self.prev_hidden.to(device)
        self.prev_hidden_rows = self.prev_hidden_rows.to(device)
        if self.memoria is not None and self.config.memoria_device is None:
            self.memoria.to(device)  # memoria_device None = live with the model

    def _leave_inference_mode(self) -> None:
        """Tensors made under torch.inference_mode (Lightning's evaluation) can neither be updated in place
        nor saved for backward outside it; rebuild the carried state from normal copies."""
        self.set_memory_state(self.get_memory_state())
        self._state_is_inference = False

    def get_memory_state(self) -> dict[str, Any]:
        return {
            "memory_kind": self.memory_kind,
            "memoria": None if self.memoria is None else _clone_tensors(self.memoria.state_dict()),
            "prev_hidden": None if self.prev_hidden is None else self.prev_hidden.detach().clone(),
            "prev_hidden_rows": None if self.prev_hidden_rows is None else self.prev_hidden_rows.clone(),
        }

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)
        missing = {"memoria", "prev_hidden", "prev_hidden_rows"} - state.keys()
        if missing:
            raise ValueError(f"memory state lacks {sorted(missing)}; pass what get_memory_state() returned")
        device = self.wte.weight.device
        if state["memoria"] is None:
            self.memoria = None
        else:
            memoria = self._new_memoria()
            memoria.load_state_dict(state["memoria"])
            if self.config.memoria_device is None:
                memoria.to(device)  # a state saved on another device lives with the model here
            self.memoria = memoria
        prev = state["prev_hidden"]
        self.prev_hidden = None if prev is None else prev.detach().clone().to(device)
        rows = state["prev_hidden_rows"]
        self.prev_hidden_rows = None if rows is None else rows.clone().to(device)
        self.last_reminded_indices = self.last_lifespan_delta = None
        self._state_is_inference = torch.is_inference_mode_enabled()

    def memory_stats(self) -> dict[str, float]:
        """Mean engram counts per row by type, and the mean lifespan gain of the last segment (host syncs:
        call it for logging only)."""
        memoria = self.memoria
        if memoria is None or memoria.timestep == 0:
            return {"memory/working": 0.0, "memory/short_term": 0.0, "memory/long_term": 0.0}
        counts = memoria.type_counts().float().mean(0).tolist()  # mean per row, indexed by EngramType
        stats = {
            "memory/working": counts[int(EngramType.WORKING)],
            "memory/short_term": counts[int(EngramType.SHORTTERM)],
            "memory/long_term": counts[int(EngramType.LONGTERM)],
        }
        if self.last_lifespan_delta is not None and self.last_reminded_indices is not None:
            valid = self.last_reminded_indices >= 0
            stats["memory/reminded"] = valid.sum(1).float().mean().item()
            if bool(valid.any()):
                stats["memory/lifespan_delta"] = self.last_lifespan_delta[valid].mean().item()
        return stats

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MemoryModelOutput:
        """One segment: input_ids (B, T), attention_mask (B, T) 1 = token, 0 = padding.

        1. If the previous segment left hidden states: WM = Abstractor(prev_hidden) (B, W, H), add it to
           Memoria, remind (B, M, H). The first segment after a reset has no memory path at all.
        2. The blocks, positions starting at 0.
        3. Δ = mean reminded attention over layers, heads and (non-padding) queries × M_b × α; adjust Memoria.
        4. prev_hidden = ln_f(h).detach() for the next segment.
        """
        if labels is not None:
            raise ValueError(
                "GPT2WithMemoriaModel has no LM head to score labels; use GPT2WithMemoriaLMHeadModel"
            )
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if T > self.max_segment_length:
            raise ValueError(
                f"segment of {T} tokens is longer than the model's {self.max_segment_length} positions; "
                "use a shorter segment or a model config with a larger n_positions"
            )
        if self.prev_hidden is not None and self.prev_hidden.shape[0] != B:
            raise ValueError(
                f"batch of {B} rows but the carried memory has {self.prev_hidden.shape[0]}; "
                "call reset_memory() before changing the batch size"
            )
        cfg = self.config
        device, dtype = input_ids.device, self.wte.weight.dtype  # where and in what the hidden states will be
        if attention_mask is not None:
            tokens = attention_mask.to(dtype)  # (B, T)
            query_weights = tokens / tokens.sum(dim=1, keepdim=True).clamp(min=1.0)  # (B, T)
        else:
            query_weights = torch.full((B, T), 1.0 / T, device=device, dtype=dtype)  # every query counts the same

        if self._state_is_inference and not torch.is_inference_mode_enabled():
            self._leave_inference_mode()
        if self.prev_hidden is not None and self.prev_hidden.device != device:
            self._move_memory(device)  # the model was moved since the memory was written

        # --- memory read, first: its device work runs while the host builds the embeddings and the mask below
        # (outside every block, so activation checkpointing never replays it)
        working_memory = reminded = reminded_idx = reminded_valid = memory_kv = None
        if self.prev_hidden is not None:
            wm_rows = self.prev_hidden_rows  # (B,)
            # WM carries gradient into the Abstractor through the working-memory attention of this segment (none
            # with memoria_use_working_memory=False: the WM is then only written to Memoria, detached).
            if self.abstractor is not None:
                wm = self.abstractor(self.prev_hidden)  # (B, W, H)
            else:
                wm = self.prev_hidden  # (B, T, H): raw hidden states as working memory
            if self.memoria is None:
                self.memoria = self._new_memoria()
            # add the WM, remind (one device call): (B, M, H) float32, (B, M) int64, -1 = none
            remembered, reminded_idx = self.memoria.add_and_remind(wm, mask=wm_rows)
            reminded_idx = reminded_idx.to(device)
            reminded_valid = reminded_idx >= 0  # (B, M)
            # both memories as the blocks read them; every block's keys and values in one batched GEMM per memory
            projections = memory_projection_parameters(self.h) if stackable_memory_projections(self.h, device) else ()
            working_memory, reminded, memory_kv = self.memory_reader(
                wm, wm_rows, remembered.to(device=device, dtype=dtype), reminded_valid, query_weights, *projections
            )

        # --- embeddings (positions restart at 0 every segment) and the causal mask
        positions = torch.arange(T, device=device)[None, :]  # (1, T)
        inputs_embeds = self.wte(input_ids)  # (B, T, H)
        h = self.drop(inputs_embeds + self.wpe(positions))  # (B, T, H)
        # No position ids for the mask: given them without an attention mask, transformers checks them for
        # packed sequences, a host sync every step (ours always run 0..T-1, one sequence a row). Without a
        # padding mask the step then makes no sync while the memory has room: the host queues the blocks while
        # the GPU reads the memory.
        causal_mask = create_causal_mask(
            config=cfg,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=None,
            position_ids=None,
        )

        # --- blocks
        layer_probs = []
        for i, block in enumerate(self.h):
            block_kv = None if memory_kv is None else memory_kv[i]
            h, probs = block(h, causal_mask, working_memory, reminded, block_kv, **kwargs)
            if probs is not None:
                layer_probs.append(probs)  # (B, M)
        hidden = self.ln_f(h)  # (B, T, H)

        # --- memory write
        if self.prev_hidden is not None:
            if not layer_probs:  # nothing reminded (M = 0): every engram ages, none is extended
                delta = torch.zeros(reminded_idx.shape, device=h.device, dtype=torch.float32)
            else:  # mean over layers, heads, queries (two kernels, not one add a layer)
                mean_probs = torch.stack(layer_probs).float().mean(0)  # (B, M)
                delta = lifespan_delta(mean_probs, reminded_valid, cfg.memoria_lifespan_extend_scale)
            self.memoria.adjust_lifespan_and_memories(reminded_idx, delta)
            self.last_reminded_indices, self.last_lifespan_delta = reminded_idx, delta
        self.prev_hidden = hidden.detach()
        self.prev_hidden_rows = torch.ones(B, dtype=torch.bool, device=hidden.device)
        self._state_is_inference = torch.is_inference_mode_enabled()

        aux_loss = hidden.new_zeros(())
        return MemoryModelOutput(loss=None, logits=None, aux_loss=aux_loss, hidden_states=hidden)


class GPT2WithMemoriaLMHeadModel(GPT2WithMemoriaPreTrainedModel, MemoryOfBaseModel):
    """GPT-2 with Memoria and a language-modelling head tied to the token embedding."""

    memory_kind = MEMORY_KIND
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # noqa: RUF012  (HF convention)

    def __init__(self, config: GPT2WithMemoriaConfig):
        super().__init__(config)
        self.transformer = GPT2WithMemoriaModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> MemoryModelOutput:
        """One segment: input_ids (B, T) -> logits (B, T, V); loss = shifted mean cross-entropy over `labels`
        (-100 ignored) when given. The memory advances by one step on every call."""
        out = self.transformer(input_ids, attention_mask=attention_mask, **kwargs)
        logits = self.lm_head(out.hidden_states)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels) + out.aux_loss
        return MemoryModelOutput(
            loss=loss, logits=logits, aux_loss=out.aux_loss, hidden_states=out.hidden_states
        )


AutoConfig.register(MEMORY_KIND, GPT2WithMemoriaConfig, exist_ok=True)
AutoModel.register(GPT2WithMemoriaConfig, GPT2WithMemoriaModel, exist_ok=True)
AutoModelForCausalLM.register(GPT2WithMemoriaConfig, GPT2WithMemoriaLMHeadModel, exist_ok=True)
