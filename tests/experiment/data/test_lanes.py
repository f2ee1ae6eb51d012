import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from experiment.data.lanes import IGNORE_INDEX, LaneStream, build_segments, rank_lanes


def offsets_of(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def test_reference_segments_drop_every_remainder():
    table = build_segments(offsets_of([7, 3, 10]), 3)
    assert table.starts.tolist() == [0, 3, 7, 10, 13, 16]
    assert table.lengths.tolist() == [3] * 6
    assert table.doc_start.tolist() == [True, False, True, True, False, False]


def test_keep_remainders_keeps_the_partial_last_segment():
    table = build_segments(offsets_of([7, 3, 10]), 3, keep_remainders=True)
    assert table.starts.tolist() == [0, 3, 6, 7, 10, 13, 16, 19]
    assert table.lengths.tolist() == [3, 3, 1, 3, 3, 3, 3, 1]
    assert table.doc_start.tolist() == [True, False, False, True, True, False, False, False]


def test_score_all_tokens_needs_a_target_inside_the_document():
    # L - 1 inputs have a next token: 6, 2, 9 -> 2, 0, 3 full segments
    table = build_segments(offsets_of([7, 3, 10]), 3, score_all_tokens=True)
    assert table.starts.tolist() == [0, 3, 10, 13, 16]
    kept = build_segments(offsets_of([7, 3, 10]), 3, score_all_tokens=True, keep_remainders=True)
    assert kept.starts.tolist() == [0, 3, 7, 10, 13, 16]
    assert kept.lengths.tolist() == [3, 3, 2, 3, 3, 3]


def test_lane_layout_is_contiguous_streams():
    tokens = np.arange(1000, dtype=np.uint16)  # one document: token value = position
    table = build_segments(offsets_of([1000]), 10)  # 100 segments
    stream = LaneStream(tokens, table, num_lanes=4)  # 25 steps; lane k = segments [25k, 25k + 25)
    assert len(stream) == 25
    batches = list(stream)
    assert [b["step"] for b in batches] == list(range(25))
    for lane in range(4):
        lane_tokens = torch.cat([b["input_ids"][lane] for b in batches])
        assert lane_tokens.tolist() == list(range(250 * lane, 250 * (lane + 1)))


def test_last_segments_beyond_a_full_step_are_dropped():
    table = build_segments(offsets_of([105]), 10)  # 10 segments, 3 lanes -> 3 steps, segment 9 dropped
    stream = LaneStream(np.arange(105), table, num_lanes=3)
    assert len(stream) == 3
    seen = torch.stack([b["input_ids"][:, 0] for b in stream]).T  # (lanes, steps) first token of each segment
    assert seen.tolist() == [[0, 10, 20], [30, 40, 50], [60, 70, 80]]


def test_reference_labels_score_t_minus_one_predictions_inside_the_segment():
    table = build_segments(offsets_of([40]), 8)
    batch = LaneStream(np.arange(100, 140), table, num_lanes=1).batch(1)
    inputs, labels = batch["input_ids"][0], batch["labels"][0]
    assert inputs.tolist() == list(range(108, 116))
    assert labels[:-1].tolist() == list(range(109, 116))
    assert labels[-1].item() == IGNORE_INDEX


def test_score_all_tokens_labels_reach_into_the_next_segment():
    table = build_segments(offsets_of([40]), 8, score_all_tokens=True)
    stream = LaneStream(np.arange(100, 140), table, num_lanes=1)
    first, second = stream.batch(0), stream.batch(1)
    assert first["labels"][0].tolist() == list(range(101, 109))
    assert second["input_ids"][0, 0].item() == 108  # scored as the last label of the previous segment


def test_padding_of_a_kept_remainder_is_not_scored():
    table = build_segments(offsets_of([11]), 8, keep_remainders=True)
    batch = LaneStream(np.arange(11), table, num_lanes=1).batch(1)
    assert batch["input_ids"][0].tolist() == [8, 9, 10, 0, 0, 0, 0, 0]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [9, 10] + [IGNORE_INDEX] * 6


def test_doc_start_marks_rows_that_begin_a_document():
    table = build_segments(offsets_of([20, 20, 20, 20]), 10)  # 8 segments, 2 lanes x 4 steps
    stream = LaneStream(np.arange(80), table, num_lanes=2)
    flags = torch.stack([b["doc_start"] for b in stream]).T  # (lanes, steps)
    assert flags.tolist() == [[True, False, True, False], [True, False, True, False]]


def test_ranks_own_fixed_disjoint_lanes_with_equal_steps():
    table = build_segments(offsets_of([997]), 7)
    tokens = np.arange(997)
    whole = list(LaneStream(tokens, table, num_lanes=4))
    per_rank = [list(LaneStream(tokens, table, 4, rank_lanes(4, 2, r))) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == len(whole)
    for step, batch in enumerate(whole):
        joined = torch.cat([per_rank[0][step]["input_ids"], per_rank[1][step]["input_ids"]])
        assert torch.equal(joined, batch["input_ids"])
    with pytest.raises(ValueError, match="multiples of the number of devices"):
        rank_lanes(3, 2, 0)


def test_start_step_resumes_mid_stream():
    table = build_segments(offsets_of([200]), 10)
    stream = LaneStream(np.arange(200), table, num_lanes=2, start_step=lambda: 4)
    assert len(stream) == 10  # the full length: the trainer counts the skipped steps itself
    assert [b["step"] for b in stream] == list(range(4, 10))


def test_dataloader_workers_keep_step_order():
    table = build_segments(offsets_of([600]), 10)
    stream = LaneStream(np.arange(600), table, num_lanes=2)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    assert [b["step"] for b in loader] == list(range(30))


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=1, max_size=12),
    segment_length=st.integers(1, 9),
    score_all=st.booleans(),
    keep=st.booleans(),
)
def test_every_target_is_scored_at_most_once_and_stays_in_its_document(lengths, segment_length, score_all, keep):
    offsets = offsets_of(lengths)
    table = build_segments(offsets, segment_length, score_all_tokens=score_all, keep_remainders=keep)
    tokens = np.arange(offsets[-1])  # token value = global position
    doc_of = np.searchsorted(offsets, tokens, side="right") - 1
    if len(table) == 0:
        return
    stream = LaneStream(tokens, table, num_lanes=1)
    scored: list[int] = []
    for batch in stream:
        inputs, labels = batch["input_ids"][0], batch["labels"][0]
        for t in np.flatnonzero(labels.numpy() != IGNORE_INDEX):
            target = int(labels[t])
            assert target == int(inputs[t]) + 1  # the next token
            assert doc_of[target] == doc_of[int(inputs[t])]  # never across a document boundary
            scored.append(target)
    assert len(scored) == len(set(scored))
    if keep and score_all:  # every token of every document but its first is scored
        expected = sum(max(n - 1, 0) for n in lengths)
        assert len(scored) == expected
    if not keep and not score_all:
        assert len(scored) == sum((n // segment_length) * (segment_length - 1) for n in lengths)


# N nodes x G GPUs: Lightning numbers ranks globally, global rank = node * G + local rank, world size = N * G.
MULTI_NODE = [(2, 1), (2, 2), (2, 4), (3, 2), (3, 4), (4, 2), (2, 6), (3, 8)]


@pytest.mark.parametrize("nodes, gpus", MULTI_NODE)
def test_lanes_partition_over_nodes_times_gpus(nodes, gpus):
    num_lanes = 48  # divisible by every world size above
    world = nodes * gpus
    owned = {(node, local): rank_lanes(num_lanes, world, node * gpus + local)
             for node in range(nodes) for local in range(gpus)}
    every = sorted(lane for lanes in owned.values() for lane in lanes)
    assert every == list(range(num_lanes))  # each lane on exactly one process of the whole job
    assert {len(lanes) for lanes in owned.values()} == {num_lanes // world}
    # Node n holds a contiguous block of lanes: its GPUs' blocks follow each other.
    for node in range(nodes):
        block = [lane for local in range(gpus) for lane in owned[(node, local)]]
        assert block == list(range(node * gpus * num_lanes // world, (node + 1) * gpus * num_lanes // world))


@pytest.mark.parametrize("nodes, gpus", [(2, 2), (3, 2), (2, 4)])
def test_multi_node_ranks_together_replay_the_single_process_stream(nodes, gpus):
    tokens = np.arange(4800, dtype=np.int64)
    table = build_segments(offsets_of([1200, 2400, 1200]), 10)  # 480 segments
    num_lanes = 24
    whole = list(LaneStream(tokens, table, num_lanes))
    world = nodes * gpus
    per_rank = [list(LaneStream(tokens, table, num_lanes, rank_lanes(num_lanes, world, rank)))
                for rank in range(world)]
    assert {len(stream) for stream in per_rank} == {len(whole)}  # every rank runs the same number of steps
    for step in (0, 7, len(whole) - 1):
        for key in ("input_ids", "labels", "doc_start"):
            joined = torch.cat([per_rank[rank][step][key] for rank in range(world)])  # in global-rank order
            assert torch.equal(joined, whole[step][key])


def test_lanes_that_do_not_divide_over_nodes_times_gpus_name_the_fix():
    with pytest.raises(ValueError, match=r"8 lanes cannot be split evenly over 12 processes \(nodes x GPUs per "
                                         r"node\).*task\.data\.lanes"):
        rank_lanes(8, 12, 0)
