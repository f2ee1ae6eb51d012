"""experiment/analysis.py: the engram metrics on hand-built histories of known structure, the co-fire counts rebuilt
from a real Memoria's history against its store, and mode=analyze on a tiny checkpoint."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from experiment import analysis
from memoria import EngramHistory, Memoria, edge_weights
from tests.conftest import TINY_SORTING, compose_config

STM, LTM = 2, 3
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def history(created=(), fired=(), deleted=(), promoted=(), counts=()) -> EngramHistory:
    """A history from event tuples in memoria/history.py's field order (extended gains are not needed here)."""
    h = EngramHistory()
    h._push("created", [list(e) for e in created])  # row, id, t
    h._push("fired", [list(e) for e in fired])  # row, id, t, type, age
    h._push("deleted", [list(e) for e in deleted])  # row, id, t, age
    h._push("promoted", [list(e) for e in promoted])  # row, id, t
    h._push("counts", [list(e) for e in counts])  # row, t, wm, stm, ltm
    return h


def test_contiguity_of_engrams_that_cofire_only_with_their_neighbour():
    # one engram a step (id t-1 created at step t); at step t the engram of step t-1 is reminded, so it fires with
    # the new working memory: each engram links to its two neighbours only, nothing dies
    T = 10
    h = history(created=[(0, t - 1, t) for t in range(1, T + 1)],
                fired=[(0, t - 2, t, STM, 1) for t in range(2, T + 1)])
    c = analysis.temporal_contiguity(h, max_lag=5)
    # fire counts: 2 (as WM, then reminded once), the last engram 1; count(i, i+1) = 1
    expected_lag1 = ((T - 1) * 0.5 + (T - 2) * 0.5 + 1.0) / (2 * (T - 1))
    assert c["mean_weight"][1] == pytest.approx(expected_lag1)
    assert c["mean_weight"][2:] == [0.0] * 4  # no link beyond the neighbour
    assert c["pairs"] == [0] + [2 * (T - lag) for lag in range(1, 6)]  # every ordered pair was in memory together
    assert c["linked_pairs"][1] == 2 * (T - 1) and c["linked_pairs"][2:] == [0] * 4
    assert math.isnan(c["mean_weight"][0])  # no two engrams of one step


def test_contiguity_counts_only_pairs_that_were_in_memory_together():
    # engram 0 (step 1) dies at step 2: with engram 3 (step 4) it never shared a step, with engram 1 (step 2) it did
    h = history(created=[(0, t - 1, t) for t in range(1, 6)], deleted=[(0, 0, 2, 1)])
    c = analysis.temporal_contiguity(h, max_lag=4)
    assert c["pairs"] == [0, 2 * 4, 2 * 3 - 2, 2 * 2 - 2, 2 * 1 - 2]  # pairs with engram 0 at lags >= 2 are gone
    assert c["mean_weight"][1:4] == [0.0] * 3  # nothing ever co-fired
    assert math.isnan(c["mean_weight"][4])  # no pair at lag 4: no mean


def test_cofire_counts_from_the_history_equal_the_memorys_own():
    m = Memoria(3, 4, 3, 4, 3, keep_history=True, deterministic=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(12):
        m.add_working_memory(torch.randn(2, 3, 5, generator=g))
        _, idx = m.remind()
        m.adjust_lifespan_and_memories(idx, torch.rand(idx.shape, generator=g) * 3)
    s, i, j, count = analysis.cofire_counts(m.history)
    fires = np.bincount(s.fired(True)[:, 1], minlength=len(s.id))
    checked = 0
    for row in range(2):
        ids, weights = edge_weights(m, row)
        at = s.lookup(np.full(len(ids), row), ids.numpy())
        assert (at >= 0).all()
        mine = np.zeros((len(ids), len(ids)))
        where = {int(a): k for k, a in enumerate(at)}
        for a, b, c in zip(i, j, count):
            if a in where and b in where:
                mine[where[a], where[b]] = c / fires[a]
        np.fill_diagonal(mine, 1.0)
        assert np.allclose(mine, weights.numpy())
        checked += int((weights > 0).sum())
    assert checked > 2 * len(ids)  # links beyond the diagonal were compared


def test_autocorrelation_of_a_stream_that_rereminds_the_same_engram():
    # engram 0 is reminded at every step 2..20: reminded again at any lag with certainty
    T = 20
    created = [(0, t - 1, t) for t in range(1, T + 1)]
    h = history(created=created, fired=[(0, 0, t, STM, t - 1) for t in range(2, T + 1)])
    a = analysis.retrieval_autocorrelation(h, max_lag=5, num_shuffles=10)
    assert a["p_rereminded"] == [1.0] * 5
    assert a["reminders"] == [T - 1 - lag for lag in range(1, 6)]
    # shuffling the steps moves step 1 (nothing reminded) among them: the control is below 1
    assert all(p < 1.0 for p in a["p_shuffled"])


def test_autocorrelation_of_runs_of_reminders_against_brute_force_and_control():
    # engram k is reminded at the 4 steps of block k (steps 2-5, 6-9, ...): strong short-lag recurrence only
    T, run = 25, 4
    created = [(0, t - 1, t) for t in range(1, T + 1)]
    fired = [(0, (t - 2) // run, t, STM, 1) for t in range(2, T + 1)]
    h = history(created=created, fired=fired)
    a = analysis.retrieval_autocorrelation(h, max_lag=6, num_shuffles=30, seed=3)
    reminded = {(e[1], e[2]) for e in fired}
    for lag, p in zip(a["lag"], a["p_rereminded"]):
        events = [(i, t) for i, t in reminded if t + lag <= T]
        assert p == pytest.approx(sum((i, t + lag) in reminded for i, t in events) / len(events))
    assert a["p_rereminded"][0] == pytest.approx(18 / 23)
    assert a["p_rereminded"][run - 1 + 1] == 0.0  # lag 5 > block length: never again
    assert a["p_shuffled"][0] < 0.4 < a["p_rereminded"][0]  # the control has no temporal order


def test_survival_shows_primacy_and_recency_as_constructed():
    # 10 steps, 2 engrams a step; those of steps 4-7 die, those of steps 1-3 became long-term
    created = [(0, 2 * (t - 1) + k, t) for t in range(1, 11) for k in range(2)]
    deleted = [(0, i, 10, 5) for (_, i, t) in created if 4 <= t <= 7]
    promoted = [(0, i, t + 1) for (_, i, t) in created if t <= 3]
    s = analysis.survival_by_creation(history(created=created, deleted=deleted, promoted=promoted), num_bins=20)
    assert s["created"] == [2] * 10 and s["alive"] == [2, 2, 2, 0, 0, 0, 0, 2, 2, 2]  # bins = 10 steps
    assert s["alive_density"] == pytest.approx([20 / 12] * 3 + [0.0] * 4 + [20 / 12] * 3)
    assert s["long_term_density"] == pytest.approx([20 / 6] * 3 + [0.0] * 7)


def test_flow_and_lifetimes_per_step():
    # two streams (rows) of 3 steps, one engram a step; row 1 drops its first engram at step 2 and promotes one
    created = [(r, t - 1, t) for r in range(2) for t in range(1, 4)]
    counts = [(r, t, 1, t - 1, 0) for r in range(2) for t in range(1, 4)]
    h = history(created=created, counts=counts, deleted=[(1, 0, 2, 2)], promoted=[(0, 0, 3)],
                fired=[(0, 0, 3, LTM, 2), (1, 1, 3, STM, 1), (0, 1, 3, STM, 1)])
    f = analysis.flow(h)
    assert f["step"] == [1, 2, 3] and f["streams"] == [2, 2, 2]
    assert f["working"] == [1.0, 1.0, 1.0] and f["short_term"] == [0.0, 1.0, 2.0]
    assert f["dropped"] == [0.0, 0.5, 0.0] and f["promoted"] == [0.0, 0.0, 0.5]
    assert f["reminded_long_term_age"][2] == 2.0 and f["reminded_short_term_age"][2] == 1.0
    life = analysis.lifetimes(h, num_bins=3)
    # created at step 1: 3 steps (alive, row 0) and 2 steps (dropped at 2, row 1); at 2: 2 steps; at 3: 1
    assert life["mean_lifetime"] == [2.5, 2.0, 1.0] and life["censored_fraction"] == [0.5, 1.0, 1.0]


def test_metrics_use_only_the_steps_whose_events_were_all_kept():
    h = EngramHistory(limit=10)
    h._push("created", [[0, t - 1, t] for t in range(1, 16)])  # 5 oldest dropped
    m = analysis.analysis_metrics(h, num_bins=5, max_lag=3, num_shuffles=2)
    assert m["window_start"] == 7 and m["engrams"] == 9 and m["dropped_events"]["created"] == 5
    json.dumps(m, allow_nan=False)  # JSON-ready: NaN became null


# --------------------------------------------------------------------------------------------------------------
# mode=analyze on a tiny checkpoint
def _digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from experiment.cli import run

    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    overrides = [*TINY_SORTING, "task.data.length=150", "trainer.max_steps=2", "trainer.limit_val_batches=1",
                 "trainer.limit_test_batches=1", "logger=csv", "print_summary=false"]
    run(compose_config(overrides), run_dir=run_dir)
    return run_dir


def test_analyze_writes_every_file_and_leaves_the_run_alone(tiny_run):
    before = _digest(tiny_run)
    # a different default config on the command line: the run's own settings come from config_resolved.yaml
    cfg = compose_config(["mode=analyze", f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}",
                          "analysis.num_examples=6", "analysis.num_shuffles=3"])
    metrics = analysis.analyze(cfg)
    out = tiny_run / "analysis"
    assert {p.name for p in out.iterdir()} == {"history.json", "metrics.json", *(f"{f}.png" for f in
                                                                               analysis.FIGURES)}
    for name in analysis.FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width >= 400 and height >= 300
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["streams"] == 6 and saved["source"]["num_examples"] == 6
    # L = 150 + 20 tokens in 32-token segments: 6 segments, 5 memory steps per example, 4 engrams a step
    assert saved["steps"] == 6 * 5 and saved["engrams"] == 6 * 5 * 4
    assert saved["flow"]["working"] == [4.0] * 5
    assert saved["survival"] == metrics["survival"]
    h = EngramHistory.load(out / "history.json")
    assert {e["row"] for e in h.table("created")} == set(range(6))
    after = _digest(tiny_run)
    assert {k: v for k, v in after.items() if not k.startswith("analysis/")} == before


def test_analyze_of_sorting_stays_within_the_history_limit(tiny_run, tmp_path):
    ckpt = f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}"
    # 8 examples a batch, 5 steps x 4 engrams each: 160 created per batch
    metrics = analysis.analyze(compose_config(["mode=analyze", ckpt, "analysis.num_examples=16",
                                               "analysis.history_limit=200", f"analysis.output_dir={tmp_path}"]))
    assert metrics["streams"] == 8 and metrics["dropped_events"]["created"] == 0  # the second batch would not fit
    from experiment.cli import ConfigError

    with pytest.raises(ConfigError, match="analysis.history_limit=100 events cannot hold one batch"):
        analysis.analyze(compose_config(["mode=analyze", ckpt, "analysis.history_limit=100",
                                         f"analysis.output_dir={tmp_path}"]))


def test_analyze_needs_a_checkpoint_and_a_memoria_model(tiny_run, tmp_path):
    from experiment.cli import ConfigError, validate_config

    with pytest.raises(ConfigError, match="mode=analyze analyses a trained model: add ckpt_path"):
        validate_config(compose_config(["mode=analyze"]))
    from experiment.cli import run

    plain = tmp_path / "plain"
    run(compose_config([*TINY_SORTING, "model=gpt2_tiny", "trainer.max_steps=1", "trainer.limit_val_batches=1",
                        "trainer.limit_test_batches=1", "logger=none", "print_summary=false"]), run_dir=plain)
    with pytest.raises(ConfigError, match="has no Memoria"):
        analysis.analyze(compose_config(["mode=analyze", f"ckpt_path={plain / 'checkpoints' / 'last.ckpt'}"]))


def test_analyze_reads_one_lane_of_the_lm_validation_split(tmp_path):
    from experiment.cli import run
    from tests.experiment.data.lm_fixtures import enwik8_like_bytes

    data = tmp_path / "enwik8"
    data.write_bytes(enwik8_like_bytes(12000, seed=3))
    lm = ["task=enwik8", "model=memoria_gpt2_tiny", "memory=tiny", f"task.data.path={data}",
          "task.data.valid_bytes=3000", "task.data.test_bytes=1000", "task.data.segment_length=32",
          "task.data.lanes=2", "trainer.max_steps=2", "trainer.limit_val_batches=2", "trainer.limit_test_batches=2",
          "trainer.enable_progress_bar=false", "logger=none", "print_summary=false"]
    run(compose_config(lm), run_dir=tmp_path / "run")
    out = tmp_path / "elsewhere"
    metrics = analysis.analyze(compose_config(["mode=analyze", f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}",
                                               "analysis.num_segments=25", f"analysis.output_dir={out}"]))
    # one stream: the first segment has no memory step, each later one adds 4 engrams
    assert metrics["streams"] == 1 and metrics["steps"] == 24 and metrics["engrams"] == 24 * 4
    assert metrics["source"]["stream"] == "validation, one lane"
    assert (out / "metrics.json").is_file() and (out / "flow.png").read_bytes().startswith(PNG_MAGIC)
    assert not (tmp_path / "run" / "analysis").exists()
    # a long stream under a small limit: the history keeps the newest events, the metrics the steps fully kept
    bounded = tmp_path / "bounded"
    metrics = analysis.analyze(compose_config(["mode=analyze", f"ckpt_path={tmp_path / 'run/checkpoints/last.ckpt'}",
                                               "analysis.num_segments=25", "analysis.history_limit=40",
                                               f"analysis.output_dir={bounded}"]))
    kept = EngramHistory.load(bounded / "history.json")
    assert max(kept.num_events().values()) <= 40 and kept.dropped["created"] == 24 * 4 - 40
    assert metrics["window_start"] > 1 and metrics["steps"] < 24


def test_memoria_exp_mode_analyze_from_the_command_line(tiny_run, tmp_path):
    import subprocess

    from tests.conftest import PYTHON, REPO_ROOT, subprocess_env

    done = subprocess.run([PYTHON, "-m", "experiment.cli", "mode=analyze",
                           f"ckpt_path={tiny_run / 'checkpoints' / 'last.ckpt'}", "analysis.num_examples=2",
                           "analysis.num_shuffles=2", f"analysis.output_dir={tmp_path / 'out'}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"],
                          cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"engram analysis written to {tmp_path / 'out'}" in done.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["streams"] == 2
    missing = subprocess.run([PYTHON, "-m", "experiment.cli", "mode=analyze", f"hydra.run.dir={tmp_path / 'h2'}"],
                             cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "add ckpt_path=" in missing.stderr + missing.stdout


def test_analyze_never_unpickles_code_from_a_checkpoint(tiny_run, tmp_path):
    import pathlib

    from experiment.checkpoints import CheckpointError

    class Planted:  # unpickling it would create a file (it could run anything)
        def __reduce__(self):
            return (pathlib.Path.touch, (tmp_path / "code-ran",))

    state = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state["hyper_parameters"] = {"payload": Planted()}
    planted = tmp_path / "checkpoints" / "last.ckpt"
    planted.parent.mkdir()
    torch.save(state, planted)
    with pytest.raises(CheckpointError, match="unpickling can run code"):
        analysis.analyze(compose_config(["mode=analyze", f"ckpt_path={planted}", "analysis.num_examples=4"]))
    assert not (tmp_path / "code-ran").exists()
