"""Memoria: the Hebbian memory network (Park & Bak, ICML 2024).

One step per segment:  add_working_memory(WM) -> remind() -> adjust_lifespan_and_memories(indices, deltas)
(add_and_remind(WM) does the first two as one call).

    working memory (WM)  the W engrams written this step; the retrieval cue
    short-term (STM)     FIFO of capacity `stm_capacity`; recalled by similarity to the WM
    long-term (LTM)      unbounded; reached from the recalled STMs through Hebbian co-fire counts
    lifespan             every engram loses 1 per step, gains what the model's attention gives it, dies at <= 0

Every batch row is an independent memory. All state is on one device in fixed slots (store.py); the per-step path
makes no host sync while the store has room (with `static_shape=True` and `validate=False`, the mode models use).
Each call's device work is a function of device tensors only (`_add_device`, `_remind_device`, `_adjust_device`,
`_add_and_remind_device`), so it can be compiled or replayed as a CUDA graph (graphs.py). Indices handed out by
`remind` are positions in the reference `engrams` layout, as in `memoria-pytorch`.

Where the reference package is wrong, this follows the corrected algorithm (no spurious engram 0, only recalled STMs
seed the walk, no edge means no step, padding never competes, global indices only; see the README).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any

import torch

from .engrams import Engrams
from .graphs import StepGraphs
from .history import EngramHistory
from .store import _RANK_BY_COMPARE, LONGTERM, NULL, SHORTTERM, WORKING, SlotStore, first_true, write_slots

WEIGHT_FORMS = ("exp", "neg_sq")
LTM_SEARCHES = ("hebbian", "random", "random_matched", "exhaustive")
_WALKS = ("hebbian", "random_matched")  # the searches that run the walk
_STATE_VERSION = 2  # 2: the device id counter in the store, no generator state
_CHUNK = 1 << 24  # elements per temporary in the graph walk (bounds peak memory at large B, C)
_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x45D9F3B  # < 2**31, so a 32-bit value times it stays below 2**63: no int64 overflow
_RANDOM_SEARCH_SALT = 0x9E3779B9  # set apart the random search's draws from the tie-breaks of the same step
_ABLATION_DEFAULTS = {"use_short_term": True, "use_long_term": True, "ltm_search": "hebbian"}  # absent in old states


def _packed_key(value: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """int64 sort keys in the order of (value, low): the float32 `value` mapped to an int32 of the same order
    (-0.0 and +0.0 equal) in the high half, `low` (int64 in [0, 2**32)) in the low half. One sort instead of two."""
    bits = (value + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: magnitude bits flipped, so the order holds
    return (ordered.to(torch.int64) << 32) | low


def _descending_order(key: torch.Tensor) -> torch.Tensor:
    """torch.sort(key, dim=1, descending=True, stable=True).indices of key (B, K), by counting instead of sorting:
    an entry's place is the number of entries before it (greater, or equal and earlier). A (B, K, K) comparison
    and a sum (one kernel when compiled) and a scatter, against a radix sort of int64 keys (~27 us on an H100 at
    the LM configuration's K of 400-550)."""
    B, K = key.shape
    pos = torch.arange(K, device=key.device)
    other, this = key[:, None, :], key[:, :, None]  # (B, 1, K) entries j, (B, K, 1) entries i
    before = (other > this) | ((other == this) & (pos[None, :] < pos[:, None]))  # (B, K, K): j goes before i
    place = before.sum(2)  # (B, K): a permutation of 0..K-1 in every row
    return torch.empty_like(place).scatter_(1, place, pos.expand(B, K))


def _order_by_counting(key: torch.Tensor) -> bool:
    """Whether _top orders its (B, K) keys by counting: on a GPU inside torch.compile, where the comparison and
    its sum fuse into one kernel over B * K * K elements, up to _RANK_BY_COMPARE of them (the bound of
    SlotStore.view_ranks' comparison). Eager they are several kernels, and on a CPU the comparisons cost more
    than the sort (compiled LM step on one core: 61 against 48 ms)."""
    B, K = key.shape
    return key.is_cuda and torch.compiler.is_compiling() and B * K * K <= _RANK_BY_COMPARE


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply) of int64 values in [0, 2**32), elementwise."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    return (x >> 16) ^ x


@contextlib.contextmanager
def _full_fp32_matmul(device: torch.device):
    """Near-ties flip under TF32, so the distance matmul runs in full fp32."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


_KERNELS: Any = None  # memoria.kernels once imported, False if Triton is missing (see _kernels)


def _kernels() -> Any:
    """The Triton kernels module (memoria/kernels.py), or None without a working Triton; imported on first use."""
    global _KERNELS
    if _KERNELS is None:
        try:
            from . import kernels
            _KERNELS = kernels
        except ImportError:  # no Triton (a CPU build of torch, macOS): the torch walk, silently
            _KERNELS = False
        except Exception as error:  # a Triton that fails on import (a mismatched install): say so once
            warnings.warn(f"Memoria: importing Triton failed ({type(error).__name__}: {error}); the graph walk "
                          "runs as torch ops", stacklevel=2)
            _KERNELS = False
    return _KERNELS or None


def _check_count(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class Memoria:
    """The memory of a batch of B independent streams.

    Reference-compatible arguments: num_reminded_stm, stm_capacity, ltm_search_depth, initial_lifespan,
    num_final_ltms, track_age, track_id, keep_history, device.

    Ours (keyword-only):
        weight_form      "exp" (exp(-d^2), the paper's runs) or "neg_sq" (-d^2, reference 1.1.0)
        seed             seed of the tie-break hash (pass seed + rank under DDP); the global RNG is never used
        deterministic    break every tie oldest-first instead of uniformly at random
        ltm_capacity     cap the long-term memory: evict the lowest-lifespan LTMs (ties: oldest) past it; also fixes
                         the store's capacity so it never grows. None (default) = unbounded, as in the paper
        initial_capacity slots per row to start with when the LTM is unbounded (grows x1.5 as needed)
        count_dtype      torch.int32 (default) or torch.int16 (half the memory; safe while a memory lives < 32767
                         steps between resets)
        static_shape     remind() returns the full width num_reminded_stm + num_final_ltms with -1 padding instead of
                         trimming to the widest row (trimming costs one host sync)
        validate         check values (NaN/inf, indices from the last remind) at a host sync per call; shapes,
                         dtypes and devices are always checked
        history_limit    most events kept by keep_history (oldest dropped first, counted)
        cuda_graph       on a GPU, replay each step's device work as CUDA graphs (graphs.py): a few launches
                         instead of hundreds. Needs static_shape=True, validate=False and keep_history=False;
                         off a GPU it changes nothing
        fused_walk       on a GPU with Triton (part of torch's CUDA builds), run remind's graph walk as one Triton
                         kernel (kernels.py) instead of ~7 small kernels a hop; same results, with or without
                         compile. Off a GPU or without Triton the torch ops run
        compile          torch.compile the step's device work (fuses its elementwise kernels; the first step at
                         each store size compiles, which takes a while); combines with cuda_graph. Needs
                         the same settings as cuda_graph

    Ablations (keyword-only; the defaults are the paper's Memoria, bit for bit):
        use_short_term   False: remind returns no short-term engrams. The STM recall still runs: its recalled
                         STMs seed the LTM search and fire with the WM and the LTMs as before (the memory's own
                         associations are unchanged), but they are not handed out, so the model does not attend
                         to them and they gain no lifespan. (Not firing them would leave the walk without seeds
                         for good: an STM gains edges to LTMs only by firing with them, so the LTM would never be
                         reached and this would equal turning off both levels.)
        use_long_term    False: remind returns no long-term engrams (no search runs); the fired set is WM +
                         returned STMs. Either way engrams still enter memory and move WM -> STM -> LTM as before
        ltm_search       how the final LTMs' candidates F are found, before the top num_final_ltms of F by
                         similarity are taken as always:
                         "hebbian"    the greedy walk over co-fire counts (algorithm.md §c.4-c.5; the default)
                         "random"     one chain per recalled STM (whatever its counts), each visiting depth + 1
                                      distinct LTMs drawn uniformly at random among the not yet visited ones (its
                                      seed included), chains taking turns hop by hop, so no two visit the same LTM;
                                      stops when none is left. |F| = min(recalled STMs x (depth + 1), live LTMs),
                                      the most the walk can visit. Drawn from a hash of (seed, engram id, step),
                                      like the tie-breaks (also with deterministic=True): same on every device,
                                      never the global RNG
                         "random_matched" as many random LTMs (drawn alike) as the walk finds in the row this
                                      step: the same candidate budget as "hebbian" (it runs the walk to count)
                         "exhaustive" every live LTM is a candidate (no walk)
                         The Triton walk kernel (fused_walk) serves the walk of "hebbian" and "random_matched".

    Output width with static_shape: k_stm + k_ltm, where k_stm = num_reminded_stm (0 without use_short_term) and
    k_ltm = num_final_ltms (0 without use_long_term), each at most what the store's size allows; -1 padding.

    Random tie-breaks come from a hash of (seed, engram id, step), not from a generator: the same on every device
    and for a row whether it runs alone or in a batch, and with no generator state to carry.
    """

    # Test hooks (class-wide defaults, settable per instance): take the GPU's sync-free path on the CPU; the backend
    # of graphs.StepGraphs (None = CUDA), to emulate CUDA graphs on the CPU; run the Triton walk off a GPU (under
    # TRITON_INTERPRET=1); score every slot, or only the candidates, whatever the sizes.
    _force_sync_free = False
    _graph_backend = None
    _walk_kernel_off_gpu = False
    _score_every_slot: bool | None = None  # None: as `_scores_every_slot` decides

    def __init__(
        self,
        num_reminded_stm: int,
        stm_capacity: int,
        ltm_search_depth: int,
        initial_lifespan: float,
        num_final_ltms: int,
        track_age: bool = False,
        track_id: bool = False,
        keep_history: bool = False,
        device: str | torch.device | None = None,
        *,
        weight_form: str = "exp",
        seed: int = 0,
        deterministic: bool = False,
        ltm_capacity: int | None = None,
        initial_capacity: int | None = None,
        count_dtype: torch.dtype = torch.int32,
        static_shape: bool = False,
        validate: bool = True,
        history_limit: int = 100_000,
        cuda_graph: bool = False,
        compile: bool = False,
        fused_walk: bool = True,
        use_short_term: bool = True,
        use_long_term: bool = True,
        ltm_search: str = "hebbian",
    ) -> None:
        self.num_reminded_stm = _check_count("num_reminded_stm", num_reminded_stm)
        self.stm_capacity = _check_count("stm_capacity", stm_capacity)
        self.ltm_search_depth = _check_count("ltm_search_depth", ltm_search_depth)
        self.num_final_ltms = _check_count("num_final_ltms", num_final_ltms)
        if isinstance(initial_lifespan, bool) or not isinstance(initial_lifespan, (int, float)) or not (
            math.isfinite(initial_lifespan) and initial_lifespan > 0
        ):
            raise ValueError(f"initial_lifespan must be a positive number, got {initial_lifespan!r}")
        self.initial_lifespan = float(initial_lifespan)
        if weight_form not in WEIGHT_FORMS:
            raise ValueError(f"weight_form must be one of {WEIGHT_FORMS}, got {weight_form!r}")
        self.weight_form = weight_form
        for name, value in (("use_short_term", use_short_term), ("use_long_term", use_long_term)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        self.use_short_term = use_short_term
        self.use_long_term = use_long_term
        if ltm_search not in LTM_SEARCHES:
            raise ValueError(f"ltm_search must be one of {LTM_SEARCHES}, got {ltm_search!r}")
        self.ltm_search = ltm_search
        if ltm_capacity is not None:
            ltm_capacity = _check_count("ltm_capacity", ltm_capacity, minimum=1)
        self.ltm_capacity = ltm_capacity
        if initial_capacity is not None:
            initial_capacity = _check_count("initial_capacity", initial_capacity, minimum=1)
        self.initial_capacity = initial_capacity
        if count_dtype not in (torch.int16, torch.int32, torch.int64):
            raise ValueError(f"count_dtype must be torch.int16, torch.int32 or torch.int64, got {count_dtype}")
        self.count_dtype = count_dtype
        self.seed = int(seed)
        self.deterministic = bool(deterministic)
        self.static_shape = bool(static_shape)
        self.validate = bool(validate)
        if keep_history and not (track_age and track_id):
            warnings.warn("keep_history=True turns on track_age and track_id", stacklevel=2)
            track_age = track_id = True
        self.track_age = bool(track_age)
        self.track_id = bool(track_id)
        self.keep_history = bool(keep_history)
        self.history_limit = _check_count("history_limit", history_limit, minimum=1)
        fast = [name for name, on in (("cuda_graph", cuda_graph), ("compile", compile)) if on]
        if fast and (not self.static_shape or self.validate or self.keep_history):
            raise ValueError(f"{' and '.join(fast)} need static_shape=True, validate=False and keep_history=False: "
                             "a captured or compiled step can neither trim its output, check values nor record "
                             "history")
        self.cuda_graph = bool(cuda_graph)
        self.compile = bool(compile)
        self.fused_walk = bool(fused_walk)
        self._compiled: dict = {}  # call name -> torch.compile'd device function
        self._set_seed(self.seed)
        self._graphs = None  # graphs.StepGraphs of the current store, when cuda_graph is on

        self.device = torch.device(device) if device is not None else None
        self.ext_device: torch.device | None = None
        self.store: SlotStore | None = None
        self.history: EngramHistory | None = None
        self.evictions: torch.Tensor | None = None  # (B,) LTMs evicted by ltm_capacity, per row
        self._clear_step_state()
        self.timestep = 0
        self.next_engram_id = 0

    # ================================================================ public API
    @property
    def engrams(self) -> Engrams:
        """The reference-layout view (a copy, built on demand; costs a host sync)."""
        if self.store is None or self._empty:
            return Engrams.empty(self.device, self.track_age, self.track_id)
        return self.store.view(self.track_age, self.track_id)

    def type_counts(self) -> torch.Tensor:
        """(B, 4) int64 on the memory's device: engrams of each EngramType per row (column NULL = free slots).
        Stays on the device: no host sync until the caller reads it."""
        if self.store is None or self._empty:
            return torch.zeros(0, 4, dtype=torch.int64)
        types = self.store.types.long()  # (B, C)
        return torch.zeros(types.shape[0], 4, dtype=torch.int64, device=types.device).scatter_add_(
            1, types, torch.ones_like(types))

    @torch.no_grad()
    def add_working_memory(self, data: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Store `data` (B, W, H) as W new working-memory engrams per row (rows where the bool `mask` (B,) is
        False add nothing)."""
        x, rows = self._prepare_add(data, mask)
        if self._wm_slots is None:
            slots, valid = self._device_call("add", self._add_device, x, rows)
            self._wm_slots, self._wm_valid = slots, valid
        else:  # a second add before adjust: both sets are working memory
            slots, valid = self._add_device(x, rows)
            self._wm_slots = torch.cat([self._wm_slots, slots], 1)
            self._wm_valid = torch.cat([self._wm_valid, valid], 1)
        self._added(valid)

    @torch.no_grad()
    def add_and_remind(self, data: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`add_working_memory(data, mask)` then `remind()`, in one call: the same results and state, with the
        device work of both in one function (one CUDA-graph replay, one compiled function), which also scores the
        new working memory from `data` instead of reading it back from the store. What a model does every step.
        Returns what `remind` returns."""
        if self._wm_slots is not None:  # working memory was added before this step's call: the two calls
            self.add_working_memory(data, mask)
            return self.remind()
        x, rows = self._prepare_add(data, mask)
        slots, valid, *reminded = self._device_call("add_remind", self._add_and_remind_device, x, rows)
        self._wm_slots, self._wm_valid = slots, valid
        self._added(valid)
        return self._reminded(*reminded)

    def _prepare_add(self, data: torch.Tensor,
                     mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Check an add's arguments (ValueError, state untouched), make the store and room for W more engrams;
        returns x (B, W, H) float32 on the memory's device and the rows that add, `mask` (B,) bool on that device
        (None: every row)."""
        if not isinstance(data, torch.Tensor):
            raise ValueError(f"data must be a torch.Tensor of shape (B, W, H), got {type(data).__name__}")
        if data.dim() != 3:
            raise ValueError(f"data must have shape (B, W, H), got shape {tuple(data.shape)}")
        if not data.is_floating_point():
            raise ValueError(f"data must be a floating-point tensor, got dtype {data.dtype}")
        B, W, H = data.shape
        if B == 0 or W == 0 or H == 0:
            raise ValueError(f"data must have B, W, H >= 1, got shape {tuple(data.shape)}")
        store = None if self._empty else self.store
        if store is not None and (B, H) != (store.batch_size, store.hidden_dim):
            raise ValueError(
                f"data has batch {B} and hidden size {H}, but the memory holds batch {store.batch_size} and hidden "
                f"size {store.hidden_dim}; call reset_memory() before changing them"
            )
        dev = self.device if self.device is not None else data.device
        if mask is not None:
            mask = self._check_rows("mask", mask, B).to(dev)
        if self.validate and not bool(torch.isfinite(data).all()):
            raise ValueError("data contains NaN or inf; working memory must be finite")

        self.ext_device = data.device
        if self.device is None:
            self.device = dev
        if store is None:
            store = self._new_store(B, W, H, dev)
        self._ensure_room(store, W)

        x = data.detach().to(device=dev, dtype=torch.float32).contiguous()  # (B, W, H)
        # contiguous inputs throughout: a compiled step guards on strides and must not recompile inside a capture
        return x, None if mask is None else mask.contiguous()

    def _added(self, valid: torch.Tensor) -> None:
        """The host-side bookkeeping of an add of W engrams per row (`valid` (B, W))."""
        W = valid.shape[1]
        self.store.live_bound += W
        self._last = None
        if self.history is not None:
            ids = self.next_engram_id + torch.arange(W, device=valid.device)
            self.history.on_add(self.timestep + 1, ids, valid)
        self.timestep += 1
        self.next_engram_id += W

    def _add_device(self, x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The device work of an add: write x (B, W, H) into W free slots per row (type WORKING in the rows where
        `rows` (B,) is True, or in every row for None; else left free). Returns (slots (B, W), valid (B, W)). Reads
        no host state that changes between steps, so it can be replayed as a CUDA graph."""
        store = self.store
        B, W, H = x.shape
        valid = torch.ones(B, W, dtype=torch.bool, device=x.device)  # built here: no input to copy in a replay
        if rows is not None:
            valid = valid & rows[:, None]
        slots = store.allocate(W)  # (B, W)
        store.clear_counts(slots)
        write_slots(store.data, 1, slots, x)
        write_slots(store.sq_norm, 1, slots, x.pow(2).sum(-1))
        write_slots(store.lifespan, 1, slots, self.initial_lifespan)
        write_slots(store.types, 1, slots, valid.to(torch.uint8) * WORKING)  # free slots stay NULL where masked
        ids = store.next_id + torch.arange(W, device=x.device)  # (W,) the same ids in every row
        write_slots(store.created, 1, slots, ids[None, :].expand(B, W))
        write_slots(store.age, 1, slots, 0)
        store.next_id += W
        return slots, valid

    @torch.no_grad()
    def remind(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Recall STMs by similarity to the working memory, walk the Hebbian graph to LTMs, fire them together.

        Returns memories (B, M, H) float32 and indices (B, M) int64 (view positions, -1 = none, padding at the end)
        on the device of the last added data.
        """
        if self.store is None or self._empty:
            raise ValueError("remind() called before any add_working_memory(); add working memory first")
        if self._wm_slots is None:
            raise ValueError("remind() needs working memory of this step: call add_working_memory() first")
        return self._reminded(*self._device_call("remind", self._remind_device, self._wm_slots, self._wm_valid))

    def _reminded(self, memories: torch.Tensor, view_idx: torch.Tensor, out_slots: torch.Tensor,
                  out_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The host side of a remind after its device work: trim (without static_shape), keep what adjust
        checks, record history, hand out copies on the caller's device."""
        if not self.static_shape:  # trim to the widest row (valid entries come first): one host sync
            width = int(out_ok.sum(1).max()) if out_ok.numel() else 0
            memories, view_idx = memories[:, :width], view_idx[:, :width]
            out_slots, out_ok = out_slots[:, :width], out_ok[:, :width]
        self._last = (out_slots, view_idx, out_ok)
        if self.history is not None:
            self.history.on_remind(self.timestep, self.store, out_slots, out_ok)
        ext = self.ext_device or self.store.device
        if self._graphs is not None:  # a replay's outputs are overwritten by the next one: hand out copies
            memories, view_idx = memories.clone(), view_idx.clone()
        return memories.to(ext).contiguous(), view_idx.to(ext)

    def _add_and_remind_device(self, x: torch.Tensor, rows: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """The device work of `add_and_remind`: `_add_device`'s outputs, then `_remind_device`'s, which takes the
        working memory from x (what the add wrote into the store)."""
        slots, valid = self._add_device(x, rows)
        row_has_wm = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if rows is None else rows
        return (slots, valid, *self._remind_device(slots, valid, x, row_has_wm))

    def _remind_device(self, wm_slots: torch.Tensor, wm_valid: torch.Tensor, wm: torch.Tensor | None = None,
                       row_has_wm: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The device work of remind for the working memory in `wm_slots` (B, W) (`wm_valid` (B, W); its data
        `wm` (B, W, H) when at hand, else read from the store; `row_has_wm` (B,) the rows that added it, when
        known, else from wm_valid): recall, walk, fire. Returns memories (B, M, H), view
        indices (B, M), slots (B, M) and ok (B, M) at the full width M = k_stm + k_ltm, valid entries first.
        Without `_sync_free` (the CPU) it takes host-side shortcuts."""
        store = self.store
        B, C, H = store.data.shape
        dev = store.device
        types, counts = store.types, store.counts
        is_stm = types == SHORTTERM  # (B, C)
        is_ltm = types == LONGTERM  # (B, C)
        if wm is None:
            wm = torch.gather(store.data, 1, wm_slots[:, :, None].expand(*wm_slots.shape, H))  # (B, W, H)
        cue = self._cue(wm, wm_valid, wm_slots)  # what _similarity needs of the WM, computed once
        if row_has_wm is None:
            row_has_wm = wm_valid.any(1)  # (B,)
        frac, tie = self._tie_keys(store)  # (B, C) each: the tie-break among equal counts, and among equal scores

        # --- STM recall: top r_stm live STMs by similarity to the WM (padding never competes)
        k_stm_cap, k_s, k_f_cap = self._caps(C)
        every_score = self._similarity(cue) if self._scores_every_slot(C, k_stm_cap + k_f_cap) else None  # (B, C)

        def score(slots: torch.Tensor) -> torch.Tensor:  # (B, K) the slots' scores against the WM
            return self._similarity(cue, slots) if every_score is None else torch.gather(every_score, 1, slots)

        stm_slots, stm_ok = first_true(is_stm, k_stm_cap)  # (B, S) each
        stm_ok = stm_ok & row_has_wm[:, None]
        stm_score = score(stm_slots)  # (B, S)
        rs_slots, rs_ok = self._top(stm_score, stm_ok, torch.gather(tie, 1, stm_slots), stm_slots, k_s)

        # --- the LTM candidates F (`found` (B, C)): the walk, or an ablation's search (none without long-term
        # memory)
        search = self.ltm_search if self.use_long_term else None
        if search in _WALKS:
            # --- initial LTMs, then the walk. `open_` (B, C + 1): the tie fraction of every LTM not yet visited,
            # -inf elsewhere; column C is a sink for "no node". A count plus it is >= 1 exactly when the count is
            # positive and the target open, so one max finds the strongest edge or shows there is none.
            open_ = torch.full((B, C + 1), -math.inf, dtype=torch.float64, device=dev)
            open_[:, :C] = torch.where(is_ltm, frac, -math.inf)
            # The walk reads only LTM columns. On the CPU (where a sync is free) gather just those; on a GPU read
            # whole count rows, which keeps every shape static.
            cols = None
            if not self._sync_free:
                cols = torch.topk(is_ltm.to(torch.uint8), int(is_ltm.sum(1).max()), dim=1, sorted=False).indices
            # each recalled STM seeds its most co-fired LTM, if it has any positive count. A chain that found no
            # edge continues from C, the count matrix's all-zero sink row, so it finds none again: stopped for good.
            seeds = torch.where(rs_ok, rs_slots, C)  # (B, k_s)
            if cols is not None or not self._walk_in_one_kernel(counts, seeds, open_):  # else done: one kernel
                # (on the CPU a sync is free: stop once every chain has; on a GPU all hops run, sync-free)
                self._torch_walk(counts, seeds, open_, self.ltm_search_depth + 1, cols,
                                 stop_early=not self._sync_free)
            found = is_ltm & torch.isneginf(open_[:, :C])  # (B, C) F = seeds + every node reached
        elif search == "exhaustive":  # every live LTM of a row with working memory
            found = is_ltm & row_has_wm[:, None]

        # --- final LTMs: top r_ltm of F by similarity to the WM
        k_l = min(self.num_final_ltms, k_f_cap)
        if search is None:
            rl_slots, rl_ok = rs_slots[:, :0], rs_ok[:, :0]  # (B, 0): no long-term memory is returned
        else:
            if search == "exhaustive":  # F is every LTM: rank the slots as they lie (k_f_cap = C)
                f_slots, f_ok = torch.arange(C, device=dev).expand(B, C), found  # (B, C) each
            elif search == "hebbian":
                f_slots, f_ok = first_true(found, k_f_cap)  # (B, F) each
            else:  # random draws: one chain per recalled STM, depth + 1 distinct LTMs each; or as many as the walk
                # found in the row ("random_matched")
                budget = (rs_ok.sum(1, keepdim=True) * (self.ltm_search_depth + 1) if search == "random"
                          else found.sum(1, keepdim=True))  # (B, 1)
                f_slots, f_ok = self._random_candidates(store, is_ltm, budget, k_f_cap)  # (B, k_f_cap) each
            f_score = score(f_slots)
            rl_slots, rl_ok = self._top(f_score, f_ok, torch.gather(tie, 1, f_slots), f_slots, k_l)

        # --- fire together, wire together: +1 on every ordered pair of the fired set, diagonal included
        fired = torch.cat([wm_slots, rs_slots, rl_slots], 1)  # (B, K)
        fired_ok = torch.cat([wm_valid, rs_ok, rl_ok], 1)  # (B, K)
        store.count_pairs(fired, fired_ok)
        if not self.use_short_term:  # recalled, seeded the search and fired, but not handed out
            rs_slots, rs_ok = rs_slots[:, :0], rs_ok[:, :0]  # (B, 0)

        # --- output: recalled STMs, then recalled LTMs (each by descending score), -1 padding at the end
        out_slots = torch.cat([rs_slots, rl_slots], 1)  # (B, k_s + k_l)
        out_ok = torch.cat([rs_ok, rl_ok], 1)
        # valid first, order kept: a stable partition by position arithmetic (no sort)
        M = out_slots.shape[1]
        valid_upto = out_ok.cumsum(1)  # (B, M) valid entries up to and including each
        n_valid = valid_upto[:, -1:]  # (B, 1)
        position = torch.arange(M, device=dev)
        dest = torch.where(out_ok, valid_upto - 1, n_valid + position - valid_upto)  # (B, M) a permutation
        out_slots = torch.empty_like(out_slots).scatter_(1, dest, out_slots)
        out_ok = position < n_valid  # (B, M)
        offset, rank = store.view_ranks(out_slots)  # (B,), (B, M): reference-layout positions of out_slots
        view_idx = torch.where(out_ok, offset[:, None] + rank, -1)  # (B, M)
        memories = torch.gather(store.data, 1, out_slots[:, :, None].expand(B, M, H)) * out_ok[:, :, None]
        return memories, view_idx, out_slots, out_ok

    @torch.no_grad()
    def adjust_lifespan_and_memories(self, indices: torch.Tensor, lifespan_delta: torch.Tensor) -> None:
        """Extend the reminded engrams by `lifespan_delta`, age everything by one step, move WM -> STM -> LTM,
        delete the expired. `indices` (B, M) must come from the last `remind` (-1 entries are ignored)."""
        if self.store is None or self._empty:
            raise ValueError("adjust_lifespan_and_memories() called on an empty memory: add working memory first")
        store = self.store
        B, C, _ = store.data.shape
        dev = store.device
        for name, t in (("indices", indices), ("lifespan_delta", lifespan_delta)):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor of shape (B, M), got {type(t).__name__}")
            if t.dim() != 2 or t.shape[0] != B:
                raise ValueError(f"{name} must have shape (B={B}, M), got shape {tuple(t.shape)}")
        if indices.is_floating_point() or indices.dtype == torch.bool or indices.is_complex():
            raise ValueError(f"indices must be an integer tensor (from remind()), got dtype {indices.dtype}")
        if lifespan_delta.dtype == torch.bool or lifespan_delta.is_complex():  # integer gains are fine (the README)
            raise ValueError(f"lifespan_delta must be a real number tensor, got dtype {lifespan_delta.dtype}")
        if lifespan_delta.shape != indices.shape:
            raise ValueError(
                f"lifespan_delta shape {tuple(lifespan_delta.shape)} must equal indices shape {tuple(indices.shape)}"
            )
        idx = indices.to(device=dev, dtype=torch.int64).contiguous()  # the caller's tensors are never written
        delta = lifespan_delta.detach().to(device=dev, dtype=torch.float32).contiguous()
        if idx.shape[1] > 0 and self._last is None:
            raise ValueError("indices did not come from the last remind(): call remind() after add_working_memory() "
                             "and pass its indices")
        if self.validate and idx.shape[1] > 0:  # checks first, so a bad call leaves the state as it was
            if not bool(torch.isfinite(delta).all()):
                raise ValueError("lifespan_delta contains NaN or inf; pass finite lifespan gains")
            _, hit = self._match_reminded(idx, *self._last)
            if bool(((idx >= 0) & ~hit).any()):
                raise ValueError("indices did not come from the last remind(): some non-negative index is not "
                                 "one of the engrams it returned")
        num_wm = self._wm_slots.shape[1] if self._wm_slots is not None else 0
        last = self._last if self._last is not None else (None, None, None)
        live_max, evicted = self._device_call("adjust", self._adjust_device, idx, delta, *last, num_wm)
        if evicted is not None:
            self.evictions += evicted
        self._wm_slots = self._wm_valid = None
        self._last = None
        self._refresh_live_bound(store, live_max)

    @staticmethod
    def _match_reminded(idx: torch.Tensor, last_slots: torch.Tensor, last_view: torch.Tensor,
                        last_ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (B, M) of the view indices `idx` (B, M) among those the last remind handed out (its slots,
        view indices and ok, (B, M')), and hit (B, M): False where the index is -1 or not one of them."""
        match = (idx[:, :, None] == last_view[:, None, :]) & last_ok[:, None, :] & (idx >= 0)[:, :, None]  # (B,M,M')
        # valid view indices are distinct, so each index matches at most one slot: the sum picks it (0 if none)
        return torch.where(match, last_slots[:, None, :], 0).sum(-1), match.any(-1)

    def _adjust_device(self, idx: torch.Tensor, delta: torch.Tensor, last_slots: torch.Tensor | None,
                       last_view: torch.Tensor | None, last_ok: torch.Tensor | None,
                       num_wm: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The device work of adjust (algorithm.md §c.9, in order). Returns the largest live count of any row
        (a 0-dim device tensor) for the host-side bound, and the LTMs evicted per row (B,) by ltm_capacity
        (None without a cap)."""
        store = self.store
        C = store.capacity
        dev = store.device
        if idx.shape[1] > 0:
            slots, hit = self._match_reminded(idx, last_slots, last_view, last_ok)
            gain = torch.where(hit, delta, 0.0)
            write_slots(store.lifespan, 1, slots, gain, accumulate=True)  # 1. extend (duplicates add up)
            if self.history is not None:
                self.history.on_extend(self.timestep, store, slots, hit, gain)

        live = store.live  # (B, C)
        store.lifespan.add_(live, alpha=-1)  # 2. decay live engrams only
        store.age.add_(live)  # 3. age
        types = store.types
        types.masked_fill_(types == WORKING, SHORTTERM)  # 4. WM -> STM
        if num_wm > 0:  # 5. STM overflow -> the oldest excess STMs become LTM (excess <= W)
            is_stm = types == SHORTTERM
            excess = (is_stm.sum(1) - self.stm_capacity).clamp(min=0)  # (B,)
            k = min(num_wm, C)
            # oldest first by engram id, as an int32 key (a GPU top-k passes over half the bits of an int64's):
            # ids back from the next one, distinct among live engrams (equal only past 2**31 - 1 ids back)
            ids_back = (store.next_id - store.created).clamp(max=torch.iinfo(torch.int32).max)  # (B, C) >= 1
            key = torch.where(is_stm, ids_back, -1).to(torch.int32)
            oldest = torch.topk(key, k, dim=1, largest=True, sorted=True).indices  # (B, k) oldest first
            promote = torch.arange(k, device=dev)[None, :] < excess[:, None]
            write_slots(types, 1, oldest, torch.where(promote, LONGTERM, torch.gather(types, 1, oldest)))
            if self.history is not None:
                self.history.on_promote(self.timestep, store, oldest, promote)
        dead = live & (store.lifespan <= 0)  # 6. delete: the slot is freed (its counts are zeroed on reuse)
        if self.history is not None:
            self.history.on_adjust(self.timestep, store, dead)
        types.masked_fill_(dead, NULL)
        evicted = None
        if self.ltm_capacity is not None and num_wm > 0:
            evicted = self._evict_ltm(store, min(num_wm, C))  # 7. optional LTM cap
        return store.live_counts().max(), evicted

    def reset_memory(self, rows: torch.Tensor | None = None) -> None:
        """Forget everything (rows=None), or only the rows where the bool mask `rows` (B,) is True."""
        if rows is None:
            if self.store is not None:
                self.store.types.zero_()  # keep the allocation (and its learned capacity) for the next stream
                self.store.next_id.zero_()
                self.store.live_bound = 0
            self._empty = True
            self._clear_step_state()
            self.timestep = 0
            self.next_engram_id = 0
            self.history = EngramHistory(self.history_limit) if self.keep_history else None
            self.evictions = None
            return
        if self.store is None or self._empty:
            return
        rows = self._check_rows("rows", rows, self.store.batch_size).to(self.store.device)
        self.store.types.masked_fill_(rows[:, None], NULL)
        if self._wm_valid is not None:
            self._wm_valid = self._wm_valid & ~rows[:, None]
        if self._last is not None:
            s, v, ok = self._last
            self._last = (s, torch.where(rows[:, None], -1, v), ok & ~rows[:, None])

    def to(self, device: str | torch.device) -> Memoria:
        """Move the memory to `device` (ties break the same way on every device)."""
        device = torch.device(device)
        if self.store is not None:
            self.store.to(device)
        for name in ("_wm_slots", "_wm_valid", "evictions"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))
        if self._last is not None:
            self._last = tuple(t.to(device) for t in self._last)
        self.device = device
        return self

    # ================================================================ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: tensors and counters. Safe to torch.save
        (tensors and plain Python values only) and to load with weights_only=True."""
        last = None if self._last is None else [t.clone() for t in self._last]
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "empty": self._empty,
            "timestep": self.timestep,
            "next_engram_id": self.next_engram_id,
            "seed": self.seed,  # the tie-break stream: a loaded memory continues it, whatever its own seed
            "device": None if self.device is None else str(self.device),
            "ext_device": None if self.ext_device is None else str(self.ext_device),
            "store": None if self.store is None or self._empty else self.store.state_dict(),
            "wm_slots": None if self._wm_slots is None else self._wm_slots.clone(),
            "wm_valid": None if self._wm_valid is None else self._wm_valid.clone(),
            "last": last,
            "evictions": None if self.evictions is None else self.evictions.clone(),
            "history": None if self.history is None else self.history.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION or "store" not in state:
            raise ValueError("not a Memoria state: pass what Memoria.state_dict() returned")
        mine, theirs = self._config(), {**_ABLATION_DEFAULTS, **state["config"]}  # older states: the defaults
        if mine != theirs:
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            raise ValueError(f"Memoria state was saved with other settings (saved, here): {diff}; build the Memoria "
                             "with the same arguments before loading")
        dev = self.device or (torch.device(state["device"]) if state["device"] else None)
        if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
            dev = torch.device("cpu")
        self.device = dev
        self.ext_device = torch.device(state["ext_device"]) if state["ext_device"] else None
        if self.ext_device is not None and self.ext_device.type == "cuda" and not torch.cuda.is_available():
            self.ext_device = dev
        self._empty = state["empty"]
        self.timestep = int(state["timestep"])
        self.next_engram_id = int(state["next_engram_id"])
        self._set_seed(int(state["seed"]))
        self.store = None if state["store"] is None else SlotStore.from_state_dict(state["store"], dev)
        self._wm_slots = None if state["wm_slots"] is None else state["wm_slots"].to(dev)
        self._wm_valid = None if state["wm_valid"] is None else state["wm_valid"].to(dev)
        self._last = None if state["last"] is None else tuple(t.to(dev) for t in state["last"])
        self.evictions = None if state["evictions"] is None else state["evictions"].to(dev)
        self.history = None
        if state["history"] is not None:
            self.history = EngramHistory.from_state_dict(state["history"])
        elif self.keep_history:
            self.history = EngramHistory(self.history_limit)

    # ================================================================ internals
    def _config(self) -> dict[str, Any]:
        return {
            "num_reminded_stm": self.num_reminded_stm, "stm_capacity": self.stm_capacity,
            "ltm_search_depth": self.ltm_search_depth, "initial_lifespan": self.initial_lifespan,
            "num_final_ltms": self.num_final_ltms, "weight_form": self.weight_form,
            "deterministic": self.deterministic, "ltm_capacity": self.ltm_capacity,
            "count_dtype": str(self.count_dtype).replace("torch.", ""),
            "use_short_term": self.use_short_term, "use_long_term": self.use_long_term,
            "ltm_search": self.ltm_search,
        }

    def _clear_step_state(self) -> None:
        self._empty = True
        self._wm_slots: torch.Tensor | None = None  # (B, W) slots of this step's working memory
        self._wm_valid: torch.Tensor | None = None  # (B, W) rows that added this step
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # slots, view idx, ok of remind
        self._bound_host: torch.Tensor | None = None  # pinned copy of the live count (CUDA)
        self._bound_event = None
        self._bound_added = 0

    def _check_rows(self, name: str, rows: torch.Tensor, B: int) -> torch.Tensor:
        if not isinstance(rows, torch.Tensor) or rows.dtype != torch.bool or rows.shape != (B,):
            shape = tuple(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
            raise ValueError(f"{name} must be a bool tensor of shape (B={B},), got {shape}")
        return rows

    def _new_store(self, B: int, W: int, H: int, dev: torch.device) -> SlotStore:
        if self.ltm_capacity is not None:
            capacity = self.stm_capacity + self.ltm_capacity + W  # never exceeded: fixed, never grows
        else:
            capacity = self.initial_capacity or self.stm_capacity + W * (math.ceil(self.initial_lifespan) + 2)
        old = self.store
        if old is not None and old.batch_size == B and old.hidden_dim == H and old.device == dev:
            store = old  # reuse the allocation after a reset
            if store.capacity < capacity:
                store.grow(capacity)
        else:
            store = SlotStore(B, H, capacity, dev, self.count_dtype)
        self.store = store
        self._empty = False
        if self.keep_history and self.history is None:
            self.history = EngramHistory(self.history_limit)
        if self.ltm_capacity is not None and self.evictions is None:
            self.evictions = torch.zeros(B, dtype=torch.int64, device=dev)
        return store

    def _ensure_room(self, store: SlotStore, W: int) -> None:
        if self._bound_event is not None and self._bound_event.query():  # the background count has landed
            store.live_bound = min(store.live_bound, int(self._bound_host) + self._bound_added)
            self._bound_event = None
        self._bound_added += W
        if store.live_bound + W <= store.capacity:
            return  # the host-side bound says there is room: no sync
        store.live_bound = int(store.live_counts().max())  # one sync, only when the store may be full
        if store.live_bound + W > store.capacity:
            store.grow(max(store.live_bound + W, math.ceil(store.capacity * 1.5 / 64) * 64))

    def _refresh_live_bound(self, store: SlotStore, live_max: torch.Tensor) -> None:
        """Tighten the host-side bound on the live count (`live_max`, a device scalar) without waiting for the
        device."""
        if self.ltm_capacity is not None:
            store.live_bound = min(store.live_bound, self.stm_capacity + self.ltm_capacity)  # invariant after adjust
        elif store.device.type != "cuda":
            store.live_bound = int(live_max)  # free on the CPU: keep the bound exact
        else:  # copy the true count to pinned memory in the background; _ensure_room reads it once it has landed
            if self._bound_host is None:
                self._bound_host = torch.zeros((), dtype=torch.int64, pin_memory=True)
            self._bound_host.copy_(live_max, non_blocking=True)
            self._bound_event = torch.cuda.Event()
            self._bound_event.record()
            self._bound_added = 0

    @property
    def _sync_free(self) -> bool:
        """Whether the step must avoid host syncs (on a GPU). On the CPU a sync is free and shortcuts pay."""
        return self.store.device.type != "cpu" or self.compile or self._force_sync_free

    def _device_call(self, name: str, fn, *args):
        """Run the device work `fn(*args)` of one call: compiled when `compile` is on, through a captured CUDA
        graph when cuda_graph is on (on a GPU), always with full-fp32 matmuls: no TF32, and no autocast from a
        calling model's mixed-precision region (near-ties flip in reduced precision)."""
        store = self.store
        if self.compile:
            compiled = self._compiled.get(name)
            if compiled is None:
                if name in ("remind", "add_remind") and self.use_long_term and self.ltm_search in _WALKS:
                    self._check_walk_kernel(store)
                compiled = self._compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False)
            fn = compiled
        with _full_fp32_matmul(store.device), torch.autocast(store.device.type, enabled=False):
            if not self.cuda_graph or store.device.type != "cuda" and self._graph_backend is None:
                return fn(*args)
            if self._graphs is None or not self._graphs.valid_for(store):
                # new or reallocated store: the old graphs point at freed memory
                self._graphs = StepGraphs(store, self._graph_backend)
            return self._graphs(name, fn, *args)

    def _set_seed(self, seed: int) -> None:
        self.seed = seed
        self._seed32 = int(_mix32(torch.tensor(seed & _MASK32)))  # mixed once: nearby seeds differ widely

    def _tie_keys(self, store: SlotStore) -> tuple[torch.Tensor, torch.Tensor]:
        """The tie-break of this step, in two forms of one order (larger wins), each (B, C):
        frac float64 in [0, 0.49]: added to integer counts it breaks their ties without changing their order;
        key int64 in [0, 2**32): the secondary key of score ties, packed below the score in `_top`'s sort key.
        Random mode: a uniform 32-bit draw per engram and step, hashed from (seed, engram id, step =
        store.next_id); distinct ids get distinct hash inputs within a step. Deterministic: older engrams first
        (the key saturates after 2**32 - 1 engram ids: past that, equal keys keep slot order)."""
        if self.deterministic:
            frac = 0.49 * (1.0 - store.created.double() / (store.next_id + 1))
            return frac, _MASK32 - store.created.clamp(max=_MASK32)
        salt = (store.next_id & _MASK32) ^ self._seed32  # () this step's salt
        u = _mix32((store.created & _MASK32) ^ salt)  # (B, C) in [0, 2**32)
        return u.double() * (0.49 / 2**32), u  # u * c keeps the order of u exactly (u < 2**32 << 2**53)

    def _caps(self, C: int) -> tuple[int, int, int]:
        """For a store of C slots a row: the most STM candidates, the STMs recalled (the walk's chains), and the
        most LTM candidates the search can find (the walk's or "random"'s k_s x (depth + 1), "exhaustive"'s C,
        none without long-term memory)."""
        k_stm_cap = min(C, self.stm_capacity)
        k_s = min(self.num_reminded_stm, k_stm_cap)
        if not self.use_long_term:
            return k_stm_cap, k_s, 0
        if self.ltm_search == "exhaustive":
            return k_stm_cap, k_s, C
        return k_stm_cap, k_s, min(C, k_s * (self.ltm_search_depth + 1))

    def _random_candidates(self, store: SlotStore, is_ltm: torch.Tensor, budget: torch.Tensor,
                           k_f_cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ltm_search="random" / "random_matched": F as (slots (B, k_f_cap), ok (B, k_f_cap)), min(budget, live
        LTMs) distinct LTMs of each row drawn uniformly at random (`budget` (B, 1) <= k_f_cap). (Their order does not
        matter: `_top` breaks score ties by the tie keys, which are distinct.)

        Chains that each hop to a uniformly random unvisited LTM, taking turns, deal out the start of a uniformly
        random order of the LTMs; so F = the LTMs with the largest random keys, one 32-bit draw per engram hashed
        from (seed, engram id, step) with a salt of its own (independent of the step's tie-breaks). Keys of
        distinct ids differ (the hash is a bijection of 32 bits), so F is exact, on every device alike."""
        if k_f_cap == 0:
            return is_ltm.new_zeros(is_ltm.shape[0], 0, dtype=torch.int64), is_ltm[:, :0]
        salt = _mix32((store.next_id & _MASK32) ^ self._seed32 ^ _RANDOM_SEARCH_SALT)  # () this step's
        key = torch.where(is_ltm, _mix32((store.created & _MASK32) ^ salt), -1)  # (B, C) int64, -1 = not an LTM
        pick = torch.topk(key, k_f_cap, dim=1).indices  # (B, k_f_cap) distinct slots, largest keys first
        take = (torch.arange(k_f_cap, device=key.device)[None, :] < budget) & torch.gather(is_ltm, 1, pick)
        return pick, take

    def _cue(self, wm: torch.Tensor, wm_valid: torch.Tensor, wm_slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The working memory wm (B, W, H) (rows `wm_valid` (B, W), stored in `wm_slots` (B, W)) as _similarity
        uses it: neg_sq its centroid (B, H); exp the vectors, minus their squared norms (B, W, 1) (the store's,
        kept by the add; -inf for invalid ones, which then never count)."""
        if self.weight_form == "neg_sq":
            w = wm_valid.to(wm.dtype)  # (B, W)
            return ((wm * w[:, :, None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1),)  # (B, H)
        neg_sq_norm = torch.where(wm_valid, -torch.gather(self.store.sq_norm, 1, wm_slots), -math.inf)  # (B, W)
        return wm, neg_sq_norm[:, :, None]

    def _scores_every_slot(self, C: int, candidates: int, gpu: bool | None = None) -> bool:
        """Whether remind scores every slot of the store against the WM, once, and picks the candidates' scores
        from that (one matmul over the store as it lies), rather than gathering the STM candidates and then the
        found LTMs and scoring each set (two gathers, two matmuls). On a GPU while the store is at most twice the
        candidates (`candidates` = their most): small batched matmuls like these (the LM configuration's) fill a
        fraction of one wave of the GPU, so one over C slots takes about the time of one of the two, and the
        gathers go; elsewhere when the store is no bigger than the candidates (less work). `gpu`: decide as on a
        GPU or not (None: by the store's device)."""
        if self._score_every_slot is not None:
            return self._score_every_slot
        if gpu is None:
            gpu = self.store.device.type == "cuda"
        return C <= (2 * candidates if gpu else candidates)

    def _similarity(self, cue: tuple[torch.Tensor, ...], slots: torch.Tensor | None = None) -> torch.Tensor:
        """Rank scores of the engrams in `slots` (B, K) (None: every slot, K = C) against the working memory
        (its `_cue`): higher = closer.

        neg_sq: mean_w -|x_w - s|^2 ranks as -|s - centroid|^2 (centroid identity).
        exp:    mean_w exp(-|x_w - s|^2) ranks as logsumexp_w(-d^2) (exact, never underflows)."""
        store = self.store
        if slots is None:
            x = store.data  # (B, C, H)
        else:
            B, K = slots.shape
            H = store.data.shape[2]
            x = torch.gather(store.data, 1, slots[:, :, None].expand(B, K, H))  # (B, K, H)
        if self.weight_form == "neg_sq":
            return -(x - cue[0][:, None, :]).pow(2).sum(-1)  # (B, K)
        x_sq = store.sq_norm if slots is None else torch.gather(store.sq_norm, 1, slots)  # (B, K) kept by the add
        wm, neg_sq_norm = cue
        # -d^2 = 2 w.x - |w|^2 - |x|^2 (one batched matmul, full fp32), never above 0; -inf for invalid WM
        neg_d2 = torch.baddbmm(neg_sq_norm - x_sq[:, None, :], wm, x.transpose(1, 2), alpha=2)
        return torch.logsumexp(neg_d2.clamp(max=0), dim=1)  # (B, K); -inf where the row has no WM

    def _top(self, score: torch.Tensor, ok: torch.Tensor, tie: torch.Tensor, slots: torch.Tensor,
             k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best of `slots` (B, K) by score (descending), ties by `tie` (a `_tie_keys` key, larger first),
        then by position; invalid never win (valid scores are finite). Returns (slots (B, k), ok (B, k)).
        One order: float32 scores map to int32 in the same order and sit above the 32-bit tie key in an int64, put
        in order by one stable sort, or when compiled and small by counting (`_descending_order`)."""
        if k == 0:
            return slots[:, :0], ok[:, :0]
        s = torch.where(ok, score, -math.inf)  # (B, K)
        if s.dtype == torch.float32:
            key = _packed_key(s, tie)  # (B, K): score, then tie
            if _order_by_counting(key):
                pick = _descending_order(key)[:, :k]  # (B, k)
            else:
                pick = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k)
        else:  # other score dtypes (a float64 default dtype): the same order from two stable sorts
            by_tie = torch.sort(tie, dim=1, descending=True, stable=True).indices
            by_score = torch.sort(torch.gather(s, 1, by_tie), dim=1, descending=True, stable=True).indices
            pick = torch.gather(by_tie, 1, by_score[:, :k])
        return torch.gather(slots, 1, pick), torch.gather(ok, 1, pick)

    def _walk_in_one_kernel(self, counts: torch.Tensor, seeds: torch.Tensor, open_: torch.Tensor) -> bool:
        """The seeds' hop and every walk hop as one Triton kernel (kernels.walk_op), where it applies
        (`fused_walk`); False where it does not, and the caller runs the torch walk. If Triton cannot build or
        launch the kernel (an untested Triton, an old GPU), warn once and turn fused_walk off: Triton fails before
        it launches, so `open_` is untouched and the torch walk gives the same result. Inside torch.compile the op
        is called as it is (`_check_walk_kernel` built it eagerly before the first trace)."""
        if not self.fused_walk or (counts.device.type != "cuda" and not self._walk_kernel_off_gpu):
            return False
        kernels = _kernels()
        if kernels is None:  # no Triton (a CPU build of torch, macOS)
            return False
        if torch.compiler.is_compiling():
            kernels.walk_op(counts, seeds, open_, self.ltm_search_depth + 1)
            return True
        try:
            kernels.walk_op(counts, seeds, open_, self.ltm_search_depth + 1)
            return True
        except Exception as error:  # any build or launch error: the torch walk is always there
            warnings.warn(f"Memoria: the Triton walk kernel failed ({type(error).__name__}: {error}); using the "
                          "torch walk (same results; pass fused_walk=False to skip the kernel)", stacklevel=2)
            self.fused_walk = False
            return False

    def _check_walk_kernel(self, store: SlotStore) -> None:
        """Build and run the walk kernel once, eagerly, at the store's sizes (one row, every chain stopped, so it
        reads only the zero sink row), so a kernel that cannot work here is turned off (with its warning) before
        torch.compile traces a step that would call it."""
        C, dev = store.capacity, store.device
        k_s = self._caps(C)[1]  # the chains, as in remind
        counts = torch.zeros(1, 1, C, dtype=self.count_dtype, device=dev).expand(1, C + 1, C)  # no memory for it
        open_ = torch.zeros(1, C + 1, dtype=torch.float64, device=dev)
        self._walk_in_one_kernel(counts, torch.full((1, k_s), C, dtype=torch.int64, device=dev), open_)

    @staticmethod
    def _torch_walk(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor, hops: int,
                    cols: torch.Tensor | None = None, stop_early: bool = False) -> None:
        """The greedy lock-step walk in torch ops (what kernels.walk must equal): `hops` hops from `src` (B, R)
        (C = no chain), each chain following its strongest unvisited LTM edge (no edge: it stops), every
        visited target closed (-inf) in `open_` (B, C + 1). `stop_early`: end once no chain moved (a host
        sync)."""
        C = counts.shape[2]
        cur = src
        for _ in range(hops):
            cur, active = Memoria._strongest_ltm(counts, cur, open_[:, :C], cols)  # (B, R)
            open_.scatter_(1, cur, -math.inf)
            if stop_early and not bool(active.any()):
                break

    @staticmethod
    def _strongest_ltm(counts: torch.Tensor, src: torch.Tensor, open_: torch.Tensor,
                       cols: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """For each source slot (B, R) (C = the sink, no edges): the open slot with the largest positive co-fire
        count (ties by its tie fraction). `open_` (B, C) float64: the tie fraction (< 0.5) of open targets, -inf
        elsewhere. Returns (target (B, R), found (B, R)); where no open target has a positive count, found is
        False and target is C. `cols` (B, L): read only these columns (all when None). Counts are read by gather,
        in chunks of sources so temporaries stay within _CHUNK elements."""
        B, R = src.shape
        C = counts.shape[2]
        if R == 0 or (cols is not None and cols.shape[1] == 0):
            return torch.full_like(src, C), torch.zeros_like(src, dtype=torch.bool)
        if cols is not None:
            open_ = torch.gather(open_, 1, cols)  # (B, L)
            flat_counts = counts.view(B, -1)
        width = C if cols is None else cols.shape[1]
        step = max(1, _CHUNK // max(1, B * width))
        targets, bests = [], []
        for lo in range(0, R, step):
            s = src[:, lo:lo + step]  # (B, r)
            if cols is None:
                rows = torch.gather(counts, 1, s[:, :, None].expand(*s.shape, C))  # (B, r, C) whole rows
            else:
                flat = (s[:, :, None] * C + cols[:, None, :]).reshape(B, -1)  # (B, r*L) positions in ((C+1)*C)
                rows = torch.gather(flat_counts, 1, flat).view(B, s.shape[1], width)  # (B, r, L)
            best, target = (rows + open_[:, None, :]).max(-1)  # (B, r) float64: >= 1 iff a positive open edge
            targets.append(target if cols is None else torch.gather(cols, 1, target))
            bests.append(best)
        target, best = (targets[0], bests[0]) if len(targets) == 1 else (torch.cat(targets, 1), torch.cat(bests, 1))
        found = best >= 1.0
        return torch.where(found, target, C), found

    def _evict_ltm(self, store: SlotStore, k: int) -> torch.Tensor:
        """Evict the LTMs with the lowest lifespan (ties: oldest) past ltm_capacity; at most k per step.
        Returns how many each row lost (B,)."""
        types = store.types
        is_ltm = types == LONGTERM
        excess = (is_ltm.sum(1) - self.ltm_capacity).clamp(min=0)  # (B,)
        life = torch.where(is_ltm, store.lifespan, math.inf)  # (B, C)
        if life.dtype == torch.float32:  # lifespan, then engram id (saturating past 2**32 - 1 ids), packed:
            # the LTMs' keys are distinct, so the k smallest in order are what a stable sort puts first
            key = _packed_key(life, store.created.clamp(max=_MASK32))
            order = torch.topk(key, k, dim=1, largest=False, sorted=True).indices  # (B, k)
        else:  # other dtypes (a float64 default dtype): oldest first, then a stable sort by lifespan
            by_age = torch.sort(torch.where(is_ltm, store.created, torch.iinfo(torch.int64).max), dim=1,
                                stable=True).indices
            by_life = torch.sort(torch.gather(life, 1, by_age), dim=1, stable=True).indices
            order = torch.gather(by_age, 1, by_life[:, :k])  # (B, k)
        evict = torch.arange(k, device=store.device)[None, :] < excess[:, None]
        if self.history is not None:
            self.history.on_evict(self.timestep, store, order, evict)
        write_slots(types, 1, order, torch.where(evict, NULL, torch.gather(types, 1, order)))
        return excess
