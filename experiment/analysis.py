"""The paper's engram analysis (experiments.md §e.5): what Memoria's memory did on an evaluation stream.

    memoria-exp mode=analyze ckpt_path=<run dir>/checkpoints/last.ckpt

loads the trained model from the checkpoint (the task, model and memory settings from the run's
`config_resolved.yaml` when it lies beside `checkpoints/`), runs the evaluation stream with a Memoria that keeps its
history (`keep_history=True`), and writes into `<run dir>/analysis/` (or `analysis.output_dir`):

    history.json   the EngramHistory (memoria/history.py's JSON; one row per stream)
    metrics.json   every number each figure shows, under the figure's name
    survival.png, contiguity.png, autocorrelation.png, flow.png

The stream: language modelling, the first `analysis.num_segments` segments of the validation split read as one lane
(memory reset once at the start; document ends do not reset it); sorting, the first `analysis.num_examples` test
examples, each its own stream from empty memory (one history row per example). The analysis works on its own copy
of the model, loaded from the checkpoint: the run's files other than `analysis/` are never written. Its memory is
bounded by the history's limit (`analysis.history_limit` events of each kind; a longer LM stream keeps the newest,
and the metrics use only the steps whose events are all kept; sorting stops adding examples before the limit).

The metrics are pure functions of an EngramHistory (numpy on its event tables), one per figure:
1. `survival_by_creation`: the engrams alive after the stream (and those of them in long-term memory) by when they
   were created (position in the stream, binned), as a density relative to uniform: (alive in bin / alive) /
   (created in bin / created); 1 everywhere = survival independent of creation time; high at the start = primacy,
   at the end = recency (a serial-position curve).
2. `temporal_contiguity`: the mean Hebbian edge weight count(i, j) / count(i, i) over ordered pairs of engrams
   against their creation lag |t_i - t_j| (in steps), with the number of pairs at each lag. Counts are rebuilt from
   the history (the fired set of a step is its working memory plus what it reminded, algorithm.md §c.7); a pair
   counts when i fired at least once and the two were in memory together at some step (a link was possible).
   (With the ablation use_short_term=False the recalled STMs fire without being returned; the history sees only
   what remind returns, so there the rebuilt counts miss those links.)
3. `retrieval_autocorrelation`: P(an engram reminded at step t is reminded again at t + lag) against lag, over the
   (t, engram) pairs with t + lag inside the stream, beside the same probability with the order of the steps'
   reminded sets shuffled (`num_shuffles` seeded permutations per stream, averaged).
4. `flow`: per step (mean over streams) the engrams of each type at the remind, how many became long-term and how
   many were dropped (lifespan out, or evicted by ltm_capacity), and the mean age of the reminded short- and
   long-term engrams (the paper's Fig. 5); and `lifetimes`: the mean number of steps an engram stayed in memory by
   its creation position (engrams still alive at the end count up to the end, marked censored).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from memoria import EngramHistory
from memoria.engrams import EngramType

log = logging.getLogger("memoria-exp")

SHORTTERM = int(EngramType.SHORTTERM)
LONGTERM = int(EngramType.LONGTERM)
FIGURES = ("survival", "contiguity", "autocorrelation", "flow")


# --------------------------------------------------------------------------------------------------------------
# event tables
def events(history: EngramHistory, kind: str) -> np.ndarray:
    """The events of one kind as an (N, fields) array (int64; float64 for `extended`, whose gain is a float)."""
    from memoria.history import EVENT_FIELDS

    rows = list(history.events[kind])
    dtype = np.float64 if kind == "extended" else np.int64
    return np.asarray(rows, dtype=dtype).reshape(len(rows), len(EVENT_FIELDS[kind]))


class Streams:
    """The history's rows as streams: for each row its steps `start[row] .. end[row]` (inclusive) whose events are
    all kept, and its engrams (created inside that window) with creation, end and promotion steps."""

    def __init__(self, history: EngramHistory):
        self.history = history
        created = events(history, "created")  # row, id, t
        counts = events(history, "counts")  # row, t, wm, stm, ltm
        steps = np.concatenate([created[:, [0, 2]], counts[:, [0, 1]]])
        self.rows = np.unique(steps[:, 0]) if len(steps) else np.zeros(0, np.int64)
        n = int(self.rows.max()) + 1 if len(self.rows) else 0
        self.end = np.zeros(n, np.int64)
        np.maximum.at(self.end, steps[:, 0], steps[:, 1])
        # The window: from the first step of the row, or, when events were dropped (oldest first), from the first
        # step at which every kind that lost events still has its events.
        first = np.full(n, np.iinfo(np.int64).max)
        np.minimum.at(first, steps[:, 0], steps[:, 1])
        self.window_start = 1
        for kind in ("created", "fired", "deleted", "promoted", "evicted", "counts"):
            if history.dropped[kind]:
                kept = events(history, kind)
                t_col = 1 if kind == "counts" else 2
                self.window_start = max(self.window_start, int(kept[:, t_col].min()) + 1 if len(kept) else 1 << 62)
        self.start = np.maximum(first, self.window_start)
        self.start[first == np.iinfo(np.int64).max] = 0
        # engrams created inside the window
        keep = created[:, 2] >= self.start[created[:, 0]] if len(created) else np.zeros(0, bool)
        created = created[keep]
        self.row, self.id, self.t_created = created[:, 0], created[:, 1], created[:, 2]
        order = np.lexsort((self.id, self.row))
        self.row, self.id, self.t_created = self.row[order], self.id[order], self.t_created[order]
        # end step of each engram (deleted or evicted; the stream's end + 1 when alive after it) and promotion
        self.t_end = np.full(len(self.id), -1, np.int64)
        self.t_promoted = np.full(len(self.id), -1, np.int64)
        for kind, target in (("deleted", self.t_end), ("evicted", self.t_end), ("promoted", self.t_promoted)):
            table = events(history, kind)
            if len(table):
                at = self.lookup(table[:, 0], table[:, 1])
                ok = at >= 0
                target[at[ok]] = table[ok, 2]
        self.alive = self.t_end < 0
        self.t_end = np.where(self.alive, self.end[self.row] + 1, self.t_end) if len(self.id) else self.t_end
        self.long_term = self.alive & (self.t_promoted >= 0)

    def lookup(self, row: np.ndarray, engram_id: np.ndarray) -> np.ndarray:
        """Index of each (row, id) among the window's engrams, -1 where it is not one."""
        if not len(self.id):
            return np.full(len(row), -1, np.int64)
        key = self.row * (1 << 40) + self.id
        want = np.asarray(row, np.int64) * (1 << 40) + np.asarray(engram_id, np.int64)
        at = np.searchsorted(key, want).clip(max=len(key) - 1)
        return np.where(key[at] == want, at, -1)

    def position(self, row: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Position of step t in its row's window, in [0, 1)."""
        span = self.end[row] - self.start[row] + 1
        return (t - self.start[row]) / np.maximum(span, 1)

    def fired(self, with_working_memory: bool) -> np.ndarray:
        """(N, 3) row, engram index (into the window's engrams), step of every firing in the window; with the
        working memory: the engrams created at a step fire at that step too (the fired set of algorithm.md §c.7)."""
        table = events(self.history, "fired")
        out = np.zeros((0, 3), np.int64)
        if len(table):
            at = self.lookup(table[:, 0], table[:, 1])
            ok = (at >= 0) & (table[:, 2] >= self.start[table[:, 0]])
            out = np.stack([table[ok, 0], at[ok], table[ok, 2]], 1)
        if with_working_memory:
            wm = np.stack([self.row, np.arange(len(self.id)), self.t_created], 1)
            out = np.concatenate([out, wm])
        return out

    def num_steps(self) -> int:
        return int((self.end[self.rows] - self.start[self.rows] + 1).clip(min=0).sum()) if len(self.rows) else 0


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.full(num.shape, np.nan), where=den > 0)


# --------------------------------------------------------------------------------------------------------------
# 1. survival by creation time
def survival_by_creation(history: EngramHistory, num_bins: int = 20) -> dict[str, Any]:
    s = Streams(history)
    longest = int((s.end[s.rows] - s.start[s.rows] + 1).max()) if len(s.rows) else 0
    bins = max(1, min(num_bins, longest))
    b = np.minimum((s.position(s.row, s.t_created) * bins).astype(np.int64), bins - 1)
    created = np.bincount(b, minlength=bins)
    alive = np.bincount(b[s.alive], minlength=bins)
    long_term = np.bincount(b[s.long_term], minlength=bins)
    share = _ratio(created, created.sum())
    return {
        "position": ((np.arange(bins) + 0.5) / bins).tolist(),  # bin centres, 0 = start of the stream
        "created": created.tolist(), "alive": alive.tolist(), "long_term": long_term.tolist(),
        "alive_density": _ratio(_ratio(alive, alive.sum()), share).tolist(),
        "long_term_density": _ratio(_ratio(long_term, long_term.sum()), share).tolist(),
        "alive_fraction": _ratio(alive, created).tolist(),
    }


# --------------------------------------------------------------------------------------------------------------
# 2. temporal contiguity of the Hebbian links
def cofire_counts(history: EngramHistory, max_lag: int | None = None) -> tuple[Streams, np.ndarray, np.ndarray,
                                                                                 np.ndarray]:
    """Co-fire counts rebuilt from the history: (streams, i, j, count) over ordered pairs i != j of engrams (indices
    into `streams`) that fired together at least once, creation lag at most `max_lag`; and the fire counts
    count(i, i) are `np.bincount` of `streams.fired(True)[:, 1]`."""
    s = Streams(history)
    fired = s.fired(with_working_memory=True)
    fired = fired[np.lexsort((fired[:, 1], fired[:, 2], fired[:, 0]))]  # by row, step
    keys = []
    step_key = fired[:, 0] * (1 << 32) + fired[:, 2]
    bounds = np.flatnonzero(np.diff(step_key)) + 1
    n = max(len(s.id), 1)
    for group in np.split(fired[:, 1], bounds):
        if len(group) < 2:
            continue
        i, j = np.meshgrid(group, group, indexing="ij")
        i, j = i.ravel(), j.ravel()
        keep = i != j
        if max_lag is not None:
            keep &= np.abs(s.t_created[i] - s.t_created[j]) <= max_lag
        keys.append(i[keep] * n + j[keep])
    if not keys:
        empty = np.zeros(0, np.int64)
        return s, empty, empty, empty
    unique, count = np.unique(np.concatenate(keys), return_counts=True)
    return s, unique // n, unique % n, count


def temporal_contiguity(history: EngramHistory, max_lag: int = 20) -> dict[str, Any]:
    s, i, j, count = cofire_counts(history, max_lag)
    fires = np.bincount(s.fired(True)[:, 1], minlength=len(s.id)) if len(s.id) else np.zeros(0, np.int64)
    lag_of_pair = np.abs(s.t_created[i] - s.t_created[j])
    weight_sum = np.bincount(lag_of_pair, weights=count / np.maximum(fires[i], 1), minlength=max_lag + 1)
    linked = np.bincount(lag_of_pair, minlength=max_lag + 1)
    # ordered pairs (i, j), i != j, i fired, both in memory at one step: count them per lag, stream by stream
    pairs = np.zeros(max_lag + 1, np.int64)
    for row in s.rows:
        sel = np.flatnonzero(s.row == row)
        if not len(sel):
            continue
        t0 = int(s.t_created[sel].min())
        tc = s.t_created[sel] - t0
        te = s.t_end[sel] - t0
        did_fire = fires[sel] > 0
        steps = int(tc.max()) + 1
        size = np.bincount(tc, minlength=steps)  # engrams created per step
        fired_at = np.bincount(tc[did_fire], minlength=steps)
        pairs[0] += int((fired_at * (size - 1)).sum())
        for lag in range(1, min(max_lag, steps - 1) + 1):
            # older i (created at t) fired and still in memory at t + lag, with any j created at t + lag; and newer j
            # (created at t + lag) fired, with any older i still in memory then
            reach = te >= tc + lag
            older_fired = np.bincount(tc[reach & did_fire], minlength=steps)[:steps - lag]
            older_any = np.bincount(tc[reach], minlength=steps)[:steps - lag]
            pairs[lag] += int((older_fired * size[lag:]).sum() + (older_any * fired_at[lag:]).sum())
    return {"lag": list(range(max_lag + 1)), "mean_weight": _ratio(weight_sum, pairs).tolist(),
            "pairs": pairs.tolist(), "linked_pairs": linked[:max_lag + 1].tolist(),
            "linked_fraction": _ratio(linked[:max_lag + 1], pairs).tolist()}


# --------------------------------------------------------------------------------------------------------------
# 3. retrieval autocorrelation
def _rereminded(row: np.ndarray, engram: np.ndarray, t: np.ndarray, end: np.ndarray, lags: range) -> tuple[
        np.ndarray, np.ndarray]:
    """(hits, events) per lag: events = reminders (row, engram, t) with t + lag <= the row's end; hits = those
    whose engram is reminded again at t + lag."""
    span = int(t.max()) + max(lags) + 2 if len(t) else 1
    key = (row * (int(engram.max()) + 1 if len(engram) else 1) + engram) * span + t
    key_set = np.unique(key)
    hits, counted = np.zeros(len(lags), np.int64), np.zeros(len(lags), np.int64)
    for k, lag in enumerate(lags):
        inside = t + lag <= end[row]
        counted[k] = int(inside.sum())
        hits[k] = int(np.isin(key[inside] + lag, key_set).sum())
    return hits, counted


def retrieval_autocorrelation(history: EngramHistory, max_lag: int = 20, num_shuffles: int = 20,
                              seed: int = 0) -> dict[str, Any]:
    s = Streams(history)
    fired = s.fired(with_working_memory=False)  # reminders only
    lags = range(1, max_lag + 1)
    row, engram, t = fired[:, 0], fired[:, 1], fired[:, 2]
    hits, counted = _rereminded(row, engram, t, s.end, lags)
    rng = np.random.default_rng(seed)
    shuffled = np.zeros(len(lags))
    for _ in range(num_shuffles):
        new_t = t.copy()
        for r in s.rows:  # permute the order of the row's steps (each step's reminded set stays whole)
            perm = rng.permutation(np.arange(s.start[r], s.end[r] + 1))
            sel = row == r
            new_t[sel] = perm[t[sel] - s.start[r]]
        h, c = _rereminded(row, engram, new_t, s.end, lags)
        shuffled += _ratio(h, c)
    return {"lag": list(lags), "p_rereminded": _ratio(hits, counted).tolist(),
            "p_shuffled": (shuffled / max(num_shuffles, 1)).tolist(), "reminders": counted.tolist(),
            "num_shuffles": num_shuffles, "seed": seed}


# --------------------------------------------------------------------------------------------------------------
# 4. type flow and lifetimes
def flow(history: EngramHistory) -> dict[str, Any]:
    s = Streams(history)
    steps = int((s.end[s.rows] - s.start[s.rows]).max()) + 1 if len(s.rows) else 0

    def per_step(row: np.ndarray, t: np.ndarray, values: np.ndarray | None = None) -> np.ndarray:
        rel = t - s.start[row]
        ok = (rel >= 0) & (rel < steps)
        return np.bincount(rel[ok], weights=None if values is None else values[ok], minlength=steps)

    streams_at = np.zeros(steps)  # streams that have each (relative) step
    for r in s.rows:
        streams_at[: s.end[r] - s.start[r] + 1] += 1
    counts = events(history, "counts")  # row, t, wm, stm, ltm
    counts = counts[counts[:, 1] >= s.start[counts[:, 0]]] if len(counts) else counts
    out: dict[str, Any] = {"step": list(range(1, steps + 1)), "streams": streams_at.astype(int).tolist()}
    recorded = per_step(counts[:, 0], counts[:, 1]) if len(counts) else np.zeros(steps)
    for col, name in ((2, "working"), (3, "short_term"), (4, "long_term")):
        total = per_step(counts[:, 0], counts[:, 1], counts[:, col].astype(np.float64)) if len(counts) else 0 * recorded
        out[name] = _ratio(total, recorded).tolist()
    for name, kinds in (("promoted", ("promoted",)), ("dropped", ("deleted", "evicted"))):
        total = np.zeros(steps)
        for kind in kinds:
            table = events(history, kind)
            if len(table):
                table = table[table[:, 2] >= s.start[table[:, 0]]]
                total += per_step(table[:, 0], table[:, 2])
        out[name] = _ratio(total, streams_at).tolist()
    fired = events(history, "fired")  # row, id, t, type, age
    if len(fired):
        fired = fired[fired[:, 2] >= s.start[fired[:, 0]]]
    for type_, name in ((SHORTTERM, "reminded_short_term_age"), (LONGTERM, "reminded_long_term_age")):
        sel = fired[fired[:, 3] == type_] if len(fired) else fired
        out[name] = (_ratio(per_step(sel[:, 0], sel[:, 2], sel[:, 4].astype(np.float64)),
                            per_step(sel[:, 0], sel[:, 2])) if len(sel) else np.full(steps, np.nan)).tolist()
    return out


def lifetimes(history: EngramHistory, num_bins: int = 20) -> dict[str, Any]:
    s = Streams(history)
    longest = int((s.end[s.rows] - s.start[s.rows] + 1).max()) if len(s.rows) else 0
    bins = max(1, min(num_bins, longest))
    b = np.minimum((s.position(s.row, s.t_created) * bins).astype(np.int64), bins - 1)
    life = (s.t_end - s.t_created + np.where(s.alive, 0, 1)).astype(np.float64)  # steps in memory
    n = np.bincount(b, minlength=bins)
    return {"position": ((np.arange(bins) + 0.5) / bins).tolist(),
            "mean_lifetime": _ratio(np.bincount(b, weights=life, minlength=bins), n).tolist(),
            "censored_fraction": _ratio(np.bincount(b[s.alive], minlength=bins), n).tolist(),
            "mean_lifetime_all": float(life.mean()) if len(life) else float("nan")}


def analysis_metrics(history: EngramHistory, num_bins: int = 20, max_lag: int = 20, num_shuffles: int = 20,
                     seed: int = 0) -> dict[str, Any]:
    """Every figure's numbers, JSON-ready (NaN as null)."""
    s = Streams(history)
    return _nan_to_none({
        "streams": int(len(s.rows)), "steps": s.num_steps(), "engrams": int(len(s.id)),
        "window_start": int(s.window_start), "dropped_events": dict(history.dropped),
        "survival": survival_by_creation(history, num_bins),
        "contiguity": temporal_contiguity(history, max_lag),
        "autocorrelation": retrieval_autocorrelation(history, max_lag, num_shuffles, seed),
        "flow": flow(history),
        "lifetimes": lifetimes(history, num_bins),
    })


# --------------------------------------------------------------------------------------------------------------
# figures
def _array(values: list) -> np.ndarray:
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def _trim_lags(ax, lags: np.ndarray, values: np.ndarray) -> None:
    """The x axis up to the last lag with a value (a short stream has none at long lags)."""
    known = lags[np.isfinite(values)]
    if len(known):
        ax.set_xlim(lags.min() - 0.5, known.max() + 0.5)


def draw_figures(metrics: dict[str, Any], out_dir: str | Path, title: str = "") -> list[Path]:
    """The four PNGs from `analysis_metrics`' numbers; returns their paths."""
    from experiment.figures import new_figure, save_figure

    out_dir = Path(out_dir)
    paths = []
    sub = f" ({title})" if title else ""

    fig, ax = new_figure()
    sv = metrics["survival"]
    x = _array(sv["position"])
    ax.plot(x, _array(sv["alive_density"]), "o-", label="alive after the stream")
    ax.plot(x, _array(sv["long_term_density"]), "s-", label="of them long-term")
    ax.axhline(1.0, color="grey", ls=":", label="uniform")
    ax.set(xlabel="creation time (position in the stream)", ylabel="density / uniform density",
           title=f"Survival by creation time{sub}")
    ax.legend()
    paths.append(save_figure(fig, out_dir / "survival.png"))

    fig, ax = new_figure()
    ct = metrics["contiguity"]
    lag = _array(ct["lag"])
    ax.plot(lag, _array(ct["mean_weight"]), "o-", label="mean count(i,j)/count(i,i)")
    ax.set(xlabel="creation lag |t_i - t_j| (steps)", ylabel="mean Hebbian edge weight",
           title=f"Temporal contiguity{sub}")
    twin = ax.twinx()
    twin.bar(lag, _array(ct["pairs"]), alpha=0.2, color="grey", label="pairs")
    twin.set_ylabel("pairs")
    ax.set_zorder(twin.get_zorder() + 1)
    ax.patch.set_visible(False)
    _trim_lags(ax, lag, _array(ct["mean_weight"]))
    ax.legend(loc="upper right")
    paths.append(save_figure(fig, out_dir / "contiguity.png"))

    fig, ax = new_figure()
    ac = metrics["autocorrelation"]
    ax.plot(ac["lag"], _array(ac["p_rereminded"]), "o-", label="reminded again at t + lag")
    ax.plot(ac["lag"], _array(ac["p_shuffled"]), "x--", color="grey", label="shuffled steps (control)")
    ax.set(xlabel="lag (steps)", ylabel="probability", title=f"Retrieval autocorrelation{sub}")
    _trim_lags(ax, _array(ac["lag"]), np.fmax(_array(ac["p_rereminded"]), _array(ac["p_shuffled"])))
    ax.legend()
    paths.append(save_figure(fig, out_dir / "autocorrelation.png"))

    fig, axes = new_figure(2, 2, size=(9.6, 6.8))
    fl, lt = metrics["flow"], metrics["lifetimes"]
    step = _array(fl["step"])
    for name in ("working", "short_term", "long_term"):
        axes[0][0].plot(step, _array(fl[name]), label=name.replace("_", "-"))
    axes[0][0].set(xlabel="step", ylabel="engrams (mean per stream)", title="engrams by type at the remind")
    axes[0][0].legend()
    axes[0][1].plot(step, _array(fl["promoted"]), label="STM -> LTM")
    axes[0][1].plot(step, _array(fl["dropped"]), label="dropped")
    axes[0][1].set(xlabel="step", ylabel="engrams per step", title="type flow")
    axes[0][1].legend()
    axes[1][0].plot(_array(lt["position"]), _array(lt["mean_lifetime"]), "o-", label="mean lifetime")
    axes[1][0].set(xlabel="creation time (position in the stream)", ylabel="steps in memory",
                   title="lifespans (alive at the end: counted to the end)")
    axes[1][1].plot(step, _array(fl["reminded_short_term_age"]), label="reminded STM")
    axes[1][1].plot(step, _array(fl["reminded_long_term_age"]), label="reminded LTM")
    axes[1][1].set(xlabel="step", ylabel="mean age (steps)", title="age of reminded engrams")
    axes[1][1].legend()
    fig.suptitle(f"Lifespan and type flow{sub}")
    paths.append(save_figure(fig, out_dir / "flow.png"))
    return paths


# --------------------------------------------------------------------------------------------------------------
# the run: mode=analyze
def _memoria_holder(model: Any) -> Any:
    """The submodule that carries a Memoria (it builds one with `_new_memoria`)."""
    for module in model.modules():
        if hasattr(module, "_new_memoria") and hasattr(module, "memoria"):
            return module
    return None


def install_history(model: Any, limit: int) -> Any:
    """Give `model`'s Memoria holder a fresh Memoria that keeps its history (the model's own settings, but eager:
    CUDA graphs and compilation cannot record history). Returns the Memoria."""
    holder = _memoria_holder(model)
    config = holder.config
    saved = (config.memoria_cuda_graph, config.memoria_compile)
    config.memoria_cuda_graph = config.memoria_compile = False
    try:
        memoria = holder._new_memoria()
    finally:
        config.memoria_cuda_graph, config.memoria_compile = saved
    memoria.keep_history = True
    memoria.track_age = memoria.track_id = True
    memoria.history_limit = int(limit)
    holder.reset_memory()
    holder.memoria = memoria
    return memoria


def _run_config(cfg: Any) -> Any:
    """cfg with task, model, memory and seed from the run's config_resolved.yaml beside the checkpoint's
    `checkpoints/` folder (when it exists and analysis.use_run_config is true)."""
    from omegaconf import OmegaConf, open_dict

    run_dir = Path(cfg.ckpt_path).expanduser().resolve().parent.parent
    saved = run_dir / "config_resolved.yaml"
    if not cfg.analysis.get("use_run_config", True) or not saved.is_file():
        return cfg
    run = OmegaConf.load(saved)
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in ("task", "model", "memory", "seed"):
            if key in run:
                cfg[key] = run[key]
    log.info("analyze: task, model and memory settings from %s", saved)
    return cfg


def output_dir(cfg: Any) -> Path:
    if cfg.analysis.get("output_dir"):
        return Path(cfg.analysis.output_dir)
    ckpt = Path(cfg.ckpt_path).expanduser().resolve()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / "analysis"


def analyze(cfg: Any) -> dict[str, Any]:
    """mode=analyze: the engram analysis of the checkpoint `cfg.ckpt_path`. Returns the metrics."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from experiment.checkpoints import read_checkpoint
    from experiment.cli import ConfigError, write_text_atomic
    from experiment.models import build_model

    if not cfg.get("ckpt_path"):
        raise ConfigError("mode=analyze analyses a trained model: add ckpt_path=<run dir>/checkpoints/last.ckpt.")
    cfg = _run_config(cfg)
    acfg = cfg.analysis
    for key in ("num_segments", "num_examples", "history_limit"):
        if int(acfg[key]) < 1:
            raise ConfigError(f"analysis.{key}={acfg[key]} must be >= 1.")
    is_lm = "segment_length" in cfg.task.module
    if not is_lm and cfg.task.name != "sorting":
        raise ConfigError(f"mode=analyze runs the sorting and language-modelling streams, not task={cfg.task.name}; "
                          "analyse a sorting, wikitext103, pg19 or enwik8 run.")
    if is_lm:
        with open_dict(cfg):
            cfg.task.data.eval_lanes = 1  # one lane of the validation split
    torch.manual_seed(int(cfg.seed))
    datamodule = instantiate(cfg.task.data)
    datamodule.prepare_data()
    datamodule.setup("validate" if is_lm else "test")
    model = build_model(cfg.model, datamodule.vocab_size)
    if _memoria_holder(model) is None:
        raise ConfigError(f"mode=analyze studies Memoria's engrams, but model {cfg.model.name} has no Memoria; "
                          "analyse a memoria_gpt2* run.")
    module = instantiate(cfg.task.module, model=model)
    state = read_checkpoint(cfg.ckpt_path)  # weights_only: nothing in the file runs
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        raise ConfigError(f"the checkpoint's weights do not fit model {cfg.model.name} ({str(error).splitlines()[0]}); "
                          "analyse with the run's settings (its config_resolved.yaml beside checkpoints/).") from error
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    device = torch.device("cuda" if accelerator != "cpu" and torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    memoria = install_history(model, int(acfg.history_limit))
    history = EngramHistory(int(acfg.history_limit))
    streams = 0
    with torch.no_grad():
        if is_lm:
            model.reset_memory()
            for k, batch in enumerate(datamodule.val_dataloader()):
                if k >= int(acfg.num_segments):
                    break
                mask = batch["attention_mask"] if batch.get("has_padding", True) else None
                model(batch["input_ids"].to(device), attention_mask=None if mask is None else mask.to(device))
            if memoria.history is not None:
                history = memoria.history
            streams = 1
        else:
            segment = int(cfg.task.module.segment_size)
            for batch in datamodule.test_dataloader():
                ids = batch["input_ids"][: int(acfg.num_examples) - streams].to(device)
                if not len(ids):
                    break
                model.reset_memory()
                for start in range(0, ids.shape[1], segment):
                    model(ids[:, start:start + segment])
                recorded = memoria.history
                if recorded is not None:
                    room = min(history.limit - n for n in history.num_events().values())
                    if any(recorded.dropped.values()) or max(recorded.num_events().values()) > room:
                        if not streams:
                            raise ConfigError(f"analysis.history_limit={history.limit} events cannot hold one batch "
                                              f"of {len(ids)} examples; raise analysis.history_limit or lower "
                                              "task.data.eval_batch_size.")
                        log.warning("analyze: the history's limit (%d events) is reached after %d examples; "
                                    "raise analysis.history_limit to analyse more", history.limit, streams)
                        break
                    history.extend(recorded, row_offset=streams)
                streams += len(ids)
                if streams >= int(acfg.num_examples):
                    break
    model.reset_memory()
    metrics = analysis_metrics(history, num_bins=int(acfg.num_bins), max_lag=int(acfg.max_lag),
                               num_shuffles=int(acfg.num_shuffles), seed=int(cfg.seed))
    metrics["source"] = {"checkpoint": str(cfg.ckpt_path), "task": cfg.task.name, "model": cfg.model.name,
                         "stream": "validation, one lane" if is_lm else "test examples",
                         "num_segments" if is_lm else "num_examples": int(acfg.num_segments if is_lm else streams),
                         "history_limit": int(acfg.history_limit)}
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    history.save(out / "history.json")
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    figures = draw_figures(metrics, out, title=f"{cfg.task.name} / {cfg.model.name}")
    log.info("analyze: %d stream(s), %d steps, %d engrams -> %s (%s)", metrics["streams"], metrics["steps"],
             metrics["engrams"], out, ", ".join(p.name for p in figures))
    print(f"engram analysis written to {out}", flush=True)
    return metrics
