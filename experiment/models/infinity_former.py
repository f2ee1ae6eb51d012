"""∞-former (Martins et al. 2022) on GPT-2 blocks: a continuous, unbounded long-term memory (LTM).

Each block adds to GPT-2's causal self-attention over the current segment a long-term attention over a
continuous signal that summarises everything before it (experiments.md §d.3):

1. Memory signal. Past states X (L x d) at positions t in [0, 1] are represented as x̄(t) = Bᵀ ψ(t), with
   ψ(t) = N Gaussian radial basis functions (centres evenly spread over [0, 1], one group per width in
   `basis_widths`), and B (N x d) fitted by ridge regression:  B = (Fᵀ W F + λ I)⁻¹ Fᵀ W X  with
   F = [ψ(t_1) .. ψ(t_L)]ᵀ and W the 0/1 weights of real (non-padding) states.
2. Unbounded memory. At the start of a segment the signal is rebuilt: the previous signal is sampled at
   `num_samples` points, the samples are squeezed into [0, τ], the previous segment's states (the block's
   inputs, detached) are laid out over (τ, 1], and B is refitted on both. A row without older memory lays the
   previous segment out over (0, 1]; a row with nothing at all reads nothing.
3. CNN mask (`mask_type: cnn`): before the fit the previous segment's states are gated by
   sigmoid(Conv1d(d, d, 3)) over time; the fit is differentiable, so the gate learns from the LM loss.
4. Sticky memories. The sample points follow the attention the signal received: the Gaussians' mass over
   `sticky_bins` equal bins of [0, 1], summed over heads and queries, is a histogram; the points are its
   (j + ½)/num_samples quantiles (a stratified, deterministic draw where the reference draws bins at random,
   so a saved state continues identically).
5. Continuous attention. Per head, keys K = B W_K and values V = B W_V live on the basis. The block's
   self-attention query q gets a Gaussian N(μ, σ²) with μ = sigmoid(w_μ · K q / √d_h) and
   σ² = softplus(w_σ · K q / √d_h), clamped at sigma_min² (the affine μ/σ heads), and reads
   z = E_{t~N(μ,σ²)}[v̄(t)] = Vᵀ r,  r_n = ∫ N(t; μ, σ²) ψ_n(t) dt = N(μ; c_n, σ² + w_n²)  in closed form.
6. KL regulariser. aux_loss = kl_weight x mean KL(N(μ, σ²) || N(μ0, σ0²)) over layers, heads and queries.
   `kl_mean_term: true` (the paper configs, as the reference computes it for μ0 = −1) is the full Gaussian KL;
   false keeps only the width term ½(σ²/σ0² − log(σ²/σ0²) − 1).

Differences from the reference: the memory is reset with the others (its LM task never reset it); sticky
samples are deterministic quantiles (above); the fit has no padding positions outside [0, 1]; no short-term
(Transformer-XL style) memory, as in the reference.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, GPT2Config, PreTrainedModel
from transformers import initialization as init
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention
from transformers.pytorch_utils import Conv1D

from .protocol import MemoryModelOutput, MemoryProtocol
from .transformer_xl import check_reset_rows, check_segment_inputs, shifted_lm_loss

MASK_TYPES = ("cnn", "none")


class InfinityFormerConfig(GPT2Config):
    """GPT2Config plus the long-term memory's settings. Defaults: the paper's sorting shape
    (infinity-gpt2-sort).

    num_basis       N, Gaussian basis functions of the continuous memory (split evenly over basis_widths)
    num_samples     points the old signal is sampled at before each refit
    basis_widths    standard deviations of the basis functions
    tau             the old memory is squeezed into [0, tau], the new segment takes (tau, 1]
    ridge_penalty   λ of the ridge regression
    sticky_memories sample the old signal where attention fell (else a uniform grid)
    sticky_bins     histogram bins over [0, 1] for sticky memories
    kl_weight, mu_0, sigma_0, kl_mean_term   the KL regulariser towards N(mu_0, sigma_0²)
    sigma_min       floor on the attention Gaussian's standard deviation
    mask_type       "cnn": gate the states by a learned Conv1d before the fit; "none": no gate
    mask_dropout    dropout on the states before the gate
    """

    model_type = "memoria_infinity_former"

    vocab_size: int = 21
    n_positions: int = 1024
    n_embd: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_inner: int | None = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_basis: int = 1024
    num_samples: int = 1024
    basis_widths: list[float] | tuple[float, ...] = (0.005, 0.01)
    tau: float = 0.5
    ridge_penalty: float = 0.5
    sticky_memories: bool = True
    sticky_bins: int = 128
    kl_weight: float = 1e-6
    mu_0: float = -1.0
    sigma_0: float = 0.05
    kl_mean_term: bool = True
    sigma_min: float = 0.01
    mask_type: str = "cnn"
    mask_dropout: float = 0.1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        name = type(self).__name__
        for key in ("num_basis", "num_samples", "sticky_bins", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"{name}.{key} must be an integer > 0, got {value!r}"
                    + (
                        "; the continuous memory needs basis functions and samples"
                        if key.startswith("num")
                        else ""
                    )
                )
        widths = list(self.basis_widths)
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"{name}.basis_widths must be a non-empty list of positive widths, got {widths}")
        if self.num_basis % len(widths):
            raise ValueError(
                f"{name}.num_basis ({self.num_basis}) must be divisible by the number of basis_widths "
                f"({len(widths)}): each width gets the same number of evenly spread centres."
            )
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"{name}.tau must be in (0, 1), got {self.tau}")
        for key in ("ridge_penalty", "sigma_0", "sigma_min"):
            if getattr(self, key) <= 0:
                raise ValueError(f"{name}.{key} must be > 0, got {getattr(self, key)}")
        if self.kl_weight < 0:
            raise ValueError(f"{name}.kl_weight must be >= 0, got {self.kl_weight}")
        if self.n_embd % self.n_head:
            raise ValueError(f"{name}.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.add_cross_attention:
            raise ValueError(f"{name}.add_cross_attention must be False")
        if self.mask_type not in MASK_TYPES:
            raise ValueError(f"{name}.mask_type must be one of {MASK_TYPES}, got {self.mask_type!r}")
        if not 0.0 <= self.mask_dropout < 1.0:
            raise ValueError(f"{name}.mask_dropout must be in [0, 1), got {self.mask_dropout}")


# ------------------------------------------------------------------------------------------------------------
# the continuous memory: basis functions, ridge regression, closed-form Gaussian expectations, sticky sampling


def gaussian_pdf(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * (x - mean) ** 2 / var) / torch.sqrt(2 * math.pi * var)


def basis_parameters(num_basis: int, widths, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres (N,) and widths (N,) in float32: for each width, num_basis / len(widths) centres evenly spread
    over [0, 1]."""
    per_width = num_basis // len(widths)
    centres = torch.linspace(0.0, 1.0, per_width, device=device).repeat(len(widths))
    sigmas = torch.tensor([float(w) for w in widths], device=device).repeat_interleave(per_width)
    return centres, sigmas


def evaluate_basis(t: torch.Tensor, centres: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """ψ(t): (..., P) positions -> (..., P, N) basis values."""
    return gaussian_pdf(t[..., None], centres, sigmas**2)


def fit_coefficients(
    positions: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    centres,
    sigmas,
    ridge_penalty: float,
) -> torch.Tensor:
    """Weighted ridge regression of values (B, P, d) at positions (B, P) onto the basis: coefficients (B, N,
    d).

    B = (Fᵀ W F + λ I)⁻¹ Fᵀ W X with F (B, P, N) the basis at the positions, W = diag(weights (B, P)).
    """
    basis = evaluate_basis(positions.float(), centres, sigmas)  # (B, P, N)
    weighted = basis * weights.float()[..., None]  # (B, P, N)
    gram = weighted.transpose(1, 2) @ basis  # (B, N, N)
    gram = gram + ridge_penalty * torch.eye(gram.size(-1), device=gram.device, dtype=gram.dtype)
    rhs = weighted.transpose(1, 2) @ values.float()  # (B, N, d)
    return torch.linalg.solve(gram, rhs)


def expected_basis(mu: torch.Tensor, var: torch.Tensor, centres, sigmas) -> torch.Tensor:
    """r_n = E_{t~N(mu, var)}[ψ_n(t)] = N(mu; c_n, var + w_n²), for mu, var (...,) -> (..., N)."""
    return gaussian_pdf(mu[..., None], centres, var[..., None] + sigmas**2)


def bin_masses(mu: torch.Tensor, sigma: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Mass of N(mu, sigma²) in each of num_bins equal bins of [0, 1]: (...,) -> (..., num_bins)."""
    edges = torch.linspace(0.0, 1.0, num_bins + 1, device=mu.device, dtype=mu.dtype)
    cdf = 0.5 * (1 + torch.erf((edges - mu[..., None]) / (sigma[..., None] * math.sqrt(2.0))))  # (..., D+1)
    return cdf[..., 1:] - cdf[..., :-1]


def sticky_positions(density: torch.Tensor, num_samples: int) -> torch.Tensor:
    """The (j + ½)/num_samples quantiles of the piecewise-uniform density over equal bins of [0, 1].

    density (B, D) non-negative bin weights -> (B, num_samples) ascending positions in [0, 1]. A flat density
    gives the uniform grid (j + ½)/num_samples.
    """
    B, D = density.shape
    p = density.float().clamp(min=0) + 1e-6  # never an empty bin, never an all-zero histogram
    p = p / p.sum(dim=-1, keepdim=True)
    cdf = torch.cumsum(p, dim=-1)  # (B, D)
    quantiles = (torch.arange(num_samples, device=p.device, dtype=p.dtype) + 0.5) / num_samples  # (S,)
    quantiles = quantiles.expand(B, num_samples).contiguous()
    bins = torch.searchsorted(cdf, quantiles).clamp(max=D - 1)  # (B, S)
    cdf_before = torch.cat([cdf.new_zeros(B, 1), cdf[:, :-1]], dim=-1).gather(1, bins)
    within = ((quantiles - cdf_before) / p.gather(1, bins)).clamp(0.0, 1.0)
    return (bins + within) / D


class LongTermMemory(nn.Module):
    """One layer's continuous memory: rebuilds the signal from the previous segment, then attends over it."""

    def __init__(self, config: InfinityFormerConfig):
        super().__init__()
        d = config.n_embd
        self.config = config
        self.n_head, self.d_head = config.n_head, d // config.n_head
        self.kv_proj = nn.Linear(d, 2 * d, bias=False)  # W_K, W_V applied to the basis coefficients
        self.out_proj = nn.Linear(d, d, bias=False)
        self.mu_head = nn.Linear(config.num_basis, 1, bias=False)  # affine map of basis scores to μ (sigmoid)
        self.sigma_head = nn.Linear(config.num_basis, 1, bias=False)  # ... and to σ² (softplus)
        self.mask_net = nn.Conv1d(d, d, kernel_size=3, padding=1) if config.mask_type == "cnn" else None
        self.mask_drop = nn.Dropout(config.mask_dropout)

    def build_signal(self, memory: dict[str, torch.Tensor], centres, widths) -> torch.Tensor:
        """The signal (B, N, d) float32: samples of the old signal in [0, tau] + the previous segment after
        it.

        memory: prev_states (B, P, d), prev_valid (B, P), coefficients (B, N, d) the old signal, past_valid
        (B,), density (B, D). Differentiable in prev_states' gate (the CNN mask); everything else is detached
        state.
        """
        config = self.config
        states = self.mask_drop(memory["prev_states"])  # (B, P, d)
        if self.mask_net is not None:
            gate = torch.sigmoid(self.mask_net(states.transpose(1, 2))).transpose(1, 2)  # (B, P, d)
            states = states * gate
        past_valid = memory["past_valid"]  # (B,)
        B, P, _ = states.shape
        device = states.device
        with torch.autocast(device_type=device.type, enabled=False):  # the regression needs float32
            if config.sticky_memories:
                samples = sticky_positions(memory["density"], config.num_samples)  # (B, S)
            else:
                grid = torch.arange(config.num_samples, device=device, dtype=torch.float32) + 0.5
                samples = (grid / config.num_samples).expand(B, -1)
            old_values = (
                evaluate_basis(samples, centres, widths) @ memory["coefficients"].float()
            )  # (B, S, d)
            fraction = (torch.arange(P, device=device, dtype=torch.float32) + 1) / P  # (P,) in (0, 1]
            new_positions = torch.where(
                past_valid[:, None], config.tau + (1 - config.tau) * fraction, fraction
            )
            positions = torch.cat([config.tau * samples, new_positions], dim=1)  # (B, S+P)
            values = torch.cat([old_values, states.float()], dim=1)  # (B, S+P, d)
            weights = torch.cat(
                [past_valid[:, None].float().expand(B, config.num_samples), memory["prev_valid"].float()],
                dim=1,
            )
            return fit_coefficients(positions, values, weights, centres, widths, config.ridge_penalty)

    def forward(self, q: torch.Tensor, coefficients: torch.Tensor, centres, widths):
        """q (B, H, T, Dh) the block's self-attention queries; coefficients (B, N, d) the signal.

        Returns the long-term context (B, T, d) and the attention Gaussians' mu, sigma (B, H, T) in float32.
        """
        B, H, T, _ = q.shape
        N = coefficients.size(1)
        k, v = self.kv_proj(coefficients.to(q.dtype)).chunk(2, dim=-1)  # (B, N, d) each: keys / values
        k = k.view(B, N, H, self.d_head).transpose(1, 2)  # (B, H, N, Dh)
        v = v.view(B, N, H, self.d_head).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d_head)  # (B, H, T, N)
        mu = torch.sigmoid(self.mu_head(scores).squeeze(-1)).float()  # (B, H, T)
        var = F.softplus(self.sigma_head(scores).squeeze(-1)).float().clamp(min=self.config.sigma_min**2)
        r = expected_basis(mu, var, centres, widths)  # (B, H, T, N)
        context = (r.to(v.dtype) @ v).transpose(1, 2).reshape(B, T, H * self.d_head)  # (B, T, d)
        return self.out_proj(context), mu, var.sqrt()


class InfinityFormerBlock(nn.Module):
    """GPT-2 block whose attention output is self-attention (current segment) + long-term attention
    (memory), both read with the same queries."""

    def __init__(self, config: InfinityFormerConfig, layer_idx: int):
        super().__init__()
        d = config.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx=layer_idx)
        self.ltm = LongTermMemory(config)
        self.ln_2 = nn.LayerNorm(d, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config.n_inner or 4 * d, config)
        self.resid_drop = nn.Dropout(config.resid_pdrop)

    def forward(self, x, causal_mask, memory, centres, widths):
        """x (B, T, d); memory: this layer's carried state. Returns x, the signal (B, N, d), its row validity
        (B,), and the attention Gaussians' mu, sigma (B, H, T)."""
        B, T, d = x.shape
        h = self.ln_1(x)  # (B, T, d)
        self_context, _ = self.attn(h, attention_mask=causal_mask)
        # the self-attention's queries serve the long-term attention too (c_attn is a Conv1D: x @ W + b)
        q = h @ self.attn.c_attn.weight[:, :d] + self.attn.c_attn.bias[:d]
        q = q.view(B, T, self.ltm.n_head, self.ltm.d_head).transpose(1, 2)  # (B, H, T, Dh)
        signal = self.ltm.build_signal(memory, centres, widths)  # (B, N, d)
        signal_valid = memory["past_valid"] | memory["prev_valid"].any(dim=1)  # (B,)
        long_context, mu, sigma = self.ltm(q, signal, centres, widths)
        # rows with an empty memory read nothing (multiplying keeps the path in the graph for DDP)
        long_context = long_context * signal_valid[:, None, None].to(long_context.dtype)
        x = x + self.resid_drop(long_context) + self_context
        x = x + self.mlp(self.ln_2(x))
        return x, signal, signal_valid, mu, sigma


class InfinityFormerModel(nn.Module):
    def __init__(self, config: InfinityFormerConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([InfinityFormerBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids, token_valid, memories):
        """memories: one carried state per layer. Returns the final hidden states (B, T, d) and, per layer,
        the block input (the next segment's memory), the signal, its row validity, mu and sigma."""
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device)  # restart at 0 every segment
        x = self.drop(self.wte(input_ids) + self.wpe(positions))  # (B, T, d)
        allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None] & token_valid[:, None, :]
        causal_mask = torch.zeros(B, 1, T, T, dtype=x.dtype, device=x.device)
        # additive (B, 1, T, T)
        causal_mask = causal_mask.masked_fill(~allowed[:, None], torch.finfo(x.dtype).min)

        # the basis is rebuilt in float32 on every call (cheap), never stored: a buffer would be cast to bf16
        # with the model and lose the centres' spacing
        centres, widths = basis_parameters(self.config.num_basis, self.config.basis_widths, x.device)
        per_layer = []
        for block, memory in zip(self.h, memories):
            block_input = x
            x, signal, signal_valid, mu, sigma = block(x, causal_mask, memory, centres, widths)
            per_layer.append((block_input, signal, signal_valid, mu, sigma))
        return self.ln_f(x), per_layer


# ------------------------------------------------------------------------------------------------------------
# the LM model and its memory protocol


class InfinityFormerPreTrainedModel(PreTrainedModel):
    config_class = InfinityFormerConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["InfinityFormerBlock"]  # noqa: RUF012  (transformers convention: the repeated block)
    _supports_sdpa = True

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, Conv1D)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        if isinstance(module, (GPT2Attention, GPT2MLP)):  # GPT-2's scaled init of the residual projections
            init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))


class InfinityFormerLMHeadModel(InfinityFormerPreTrainedModel, MemoryProtocol):
    """∞-former GPT-2 language model carrying its continuous memory from one call to the next."""

    memory_kind = "infinity_former"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}  # noqa: RUF012  (HF convention)

    def __init__(self, config: InfinityFormerConfig):
        super().__init__(config)
        self.transformer = InfinityFormerModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        return int(self.config.n_positions)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemoryModelOutput:
        token_valid = check_segment_inputs(
            "∞-former", input_ids, attention_mask, labels, self.max_segment_length, "n_positions"
        )
        memories = self._memories_for(input_ids.size(0), input_ids.device)
        hidden, per_layer = self.transformer(input_ids, token_valid, memories)
        logits = self.lm_head(hidden)  # (B, T, V)
        kl = torch.stack([self._kl(mu, sigma) for *_, mu, sigma in per_layer]).mean()
        aux_loss = self.config.kl_weight * kl
        self._carry_memory(per_layer, token_valid)

        loss = None
        if labels is not None:
            loss = shifted_lm_loss(logits, labels) + aux_loss
        return MemoryModelOutput(loss=loss, logits=logits, aux_loss=aux_loss, hidden_states=hidden)

    def _kl(self, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Mean KL(N(mu, sigma²) || N(mu_0, sigma_0²)) over (B, H, T); the mean term only with
        kl_mean_term."""
        config = self.config
        ratio = (sigma / config.sigma_0) ** 2
        kl = 0.5 * (ratio - torch.log(ratio) - 1.0)
        if config.kl_mean_term:
            kl = kl + (mu - config.mu_0) ** 2 / (2 * config.sigma_0**2)
        return kl.mean()

    # ---- carried state ------------------------------------------------------------------------------------
    # per layer: prev_states (B, P, d) the previous segment's block inputs, coefficients (B, N, d) the signal
    # built at the previous segment (float32), density (B, sticky_bins) where its attention fell;
    # shared by the layers: prev_valid (B, P) real tokens of the previous segment, past_valid (B,) rows whose
    # signal holds anything.

    def _empty_state(self, batch_size: int, device: torch.device) -> dict[str, Any]:
        config, n = self.config, self.config.n_layer
        one_empty_step = torch.zeros(batch_size, 1, config.n_embd, device=device)  # keeps shapes static
        coefficients = torch.zeros(batch_size, config.num_basis, config.n_embd, device=device)
        flat = torch.ones(batch_size, config.sticky_bins, device=device)
        return {
            "prev_states": [one_empty_step] * n,
            "prev_valid": torch.zeros(batch_size, 1, dtype=torch.bool, device=device),
            "coefficients": [coefficients] * n,
            "past_valid": torch.zeros(batch_size, dtype=torch.bool, device=device),
            "density": [flat] * n,
        }

    def _memories_for(self, batch_size: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
        state = self._state if self._state is not None else self._empty_state(batch_size, device)
        if state["past_valid"].size(0) != batch_size:
            raise ValueError(
                f"∞-former memory holds {state['past_valid'].size(0)} rows but the input has {batch_size}; "
                "call reset_memory() before changing the batch size."
            )

        def usable(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device)
            # memory written under inference_mode (evaluation) cannot be saved for backward: use a copy
            return t.clone() if t.is_inference() and not torch.is_inference_mode_enabled() else t

        dtype = self.transformer.wte.weight.dtype
        return [
            {
                "prev_states": usable(state["prev_states"][i]).to(dtype),
                "prev_valid": usable(state["prev_valid"]),
                "coefficients": usable(state["coefficients"][i]),
                "past_valid": usable(state["past_valid"]),
                "density": usable(state["density"][i]),
            }
            for i in range(self.config.n_layer)
        ]

    @torch.no_grad()
    def _carry_memory(self, per_layer, token_valid: torch.Tensor) -> None:
        """Keep this segment's block inputs for the next signal, the signal just read, and where it was
        read."""
        bins = self.config.sticky_bins
        queries = token_valid[:, None, :, None].float()  # (B, 1, T, 1)
        signal_valid = per_layer[0][2]
        densities = []
        for _, _, _, mu, sigma in per_layer:
            masses = (bin_masses(mu.detach(), sigma.detach(), bins) * queries).sum(dim=(1, 2))  # (B, D)
            densities.append(torch.where(signal_valid[:, None], masses, torch.ones_like(masses)))
        self._state = {
            "prev_states": [block_input.detach() for block_input, *_ in per_layer],
            "prev_valid": token_valid.clone(),
            "coefficients": [signal.detach().float() for _, signal, *_ in per_layer],
            "past_valid": signal_valid.clone(),
            "density": densities,
        }

    # ---- memory protocol ----------------------------------------------------------------------------------

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        if rows is None or self._state is None:
            self._state = None
            return
        s = self._state
        rows = check_reset_rows(rows, s["past_valid"].size(0)).to(s["past_valid"].device)
        self._state = {
            "prev_states": [t.masked_fill(rows[:, None, None], 0.0) for t in s["prev_states"]],
            "prev_valid": s["prev_valid"] & ~rows[:, None],
            "coefficients": [t.masked_fill(rows[:, None, None], 0.0) for t in s["coefficients"]],
            "past_valid": s["past_valid"] & ~rows,
            "density": [t.masked_fill(rows[:, None], 1.0) for t in s["density"]],
        }

    def get_memory_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"memory_kind": self.memory_kind}
        if self._state is not None:
            for key, value in self._state.items():
                state[key] = [t.detach().clone() for t in value] if isinstance(value, list) else value.clone()
        return state

    def set_memory_state(self, state: dict[str, Any]) -> None:
        self._check_memory_state(state)
        if "coefficients" not in state:
            self.reset_memory()
            return
        config = self.config
        B = state["past_valid"].shape[0]
        P = state["prev_valid"].shape[1] if state["prev_valid"].dim() == 2 else -1
        expected = {
            "prev_states": (B, P, config.n_embd),
            "coefficients": (B, config.num_basis, config.n_embd),
            "density": (B, config.sticky_bins),
        }
        if not 0 < P <= config.n_positions or tuple(state["prev_valid"].shape) != (B, P):
            raise ValueError(
                f"memory state's prev_valid of shape {tuple(state['prev_valid'].shape)} does not fit "
                f"(batch {B}, at most {config.n_positions} positions)."
            )
        for key, shape in expected.items():
            tensors = state[key]
            if len(tensors) != config.n_layer:
                raise ValueError(
                    f"memory state has {len(tensors)} layers of {key}, this ∞-former has {config.n_layer}; "
                    "it was written by a different configuration."
                )
            for t in tensors:
                if tuple(t.shape) != shape:
                    raise ValueError(
                        f"memory state's {key} of shape {tuple(t.shape)} does not fit {shape}; it was "
                        "written by a different ∞-former configuration."
                    )
        device = self.transformer.wte.weight.device
        self._state = {
            "prev_states": [t.detach().clone().float().to(device) for t in state["prev_states"]],
            "prev_valid": state["prev_valid"].clone().bool().to(device),
            "coefficients": [t.detach().clone().float().to(device) for t in state["coefficients"]],
            "past_valid": state["past_valid"].clone().bool().to(device),
            "density": [t.detach().clone().float().to(device) for t in state["density"]],
        }

    def memory_stats(self) -> dict[str, float]:
        if self._state is None:
            return {"ltm_valid_fraction": 0.0}
        filled = self._state["past_valid"] | self._state["prev_valid"].any(dim=1)
        return {"ltm_valid_fraction": float(filled.float().mean().item())}


AutoConfig.register(InfinityFormerConfig.model_type, InfinityFormerConfig, exist_ok=True)
AutoModel.register(InfinityFormerConfig, InfinityFormerLMHeadModel, exist_ok=True)
AutoModelForCausalLM.register(InfinityFormerConfig, InfinityFormerLMHeadModel, exist_ok=True)
