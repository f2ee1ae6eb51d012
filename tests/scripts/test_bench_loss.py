"""scripts/bench_loss.py: the LM loss's formulations, timed on a small CPU shape."""

import json

import pytest

from tests.scripts import load_script


def test_formulations_are_timed_and_give_the_same_loss(tmp_path, capsys):
    path = tmp_path / "loss.json"
    rows = load_script("bench_loss").main(["--device", "cpu", "--batch-size", "2", "--seq-len", "7",
                                           "--vocab-size", "50", "--repeats", "2", "--warmup", "1",
                                           "--json", str(path)])
    by_name = {row["formulation"]: row for row in rows}
    assert list(by_name) == ["sliced", "shifted", "task"]
    assert all(row["median_ms"] > 0 for row in rows) and by_name["sliced"]["x_sliced"] == 1.0
    assert by_name["shifted"]["loss"] == pytest.approx(by_name["sliced"]["loss"], rel=1e-6)
    assert by_name["task"]["loss"] == pytest.approx(by_name["sliced"]["loss"], rel=1e-6)  # the same targets
    assert json.loads(path.read_text())["rows"][2]["formulation"] == "task"
    assert "x sliced" in capsys.readouterr().out


def test_a_segment_of_one_token_is_refused():
    with pytest.raises(SystemExit):
        load_script("bench_loss").main(["--device", "cpu", "--seq-len", "1"])


def test_the_compiled_task_loss_is_timed_on_request():
    import torch

    rows = load_script("bench_loss").main(["--device", "cpu", "--batch-size", "2", "--seq-len", "5",
                                           "--vocab-size", "40", "--repeats", "1", "--warmup", "1", "--compiled"])
    torch._dynamo.reset()
    by_name = {row["formulation"]: row for row in rows}
    assert list(by_name) == ["sliced", "shifted", "task", "compiled"]
    assert by_name["compiled"]["loss"] == pytest.approx(by_name["task"]["loss"], rel=1e-5)
