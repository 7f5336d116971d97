"""The frontier sweep's bookkeeping (nanoalign/toy/frontier.py): which finished runs it reuses, the runs at an
algorithm's defaults, the plot with many algorithms. Training is replaced by a fake train.py main() that writes
what a real run leaves behind (ckpt.pt with the resolved config, eval.json), so every test takes well under a second;
tests/test_toy_pipeline.py runs the real sweep on the tiny toy world."""
import json
import os
import sys
import time

import pytest

from nanoalign.checkpoint import save_checkpoint
from nanoalign.toy import frontier

EVAL = {"kl": 0.5, "kl_se": 0.1, "gold_reward": 0.6, "gold_reward_se": 0.02, "win_rate": 0.6, "grammatical": 0.9,
        "length": 14.0, "ref_gold_reward": 0.5, "ref_gold_reward_se": 0.02, "ref_grammatical": 0.95, "ref_length": 14.3}


@pytest.fixture
def fake_training(tmp_path, monkeypatch):
    """Replaces train.py's main(); returns the list of argv it was called with. Each fake run saves its config the
    way train.py does after the toy world filled in the data and init paths, and a KL that grows with the run count."""
    data, init = tmp_path / "prefs.jsonl", tmp_path / "sft"
    data.write_text("{}\n")
    save_checkpoint(init / "ckpt.pt", config={})
    calls = []

    def main(argv):
        calls.append(argv)
        config = {**frontier.requested_config(argv), "data": str(data), "init_from": f"ckpt:{init}", "device": "cpu"}
        save_checkpoint(tmp_path / config["out_dir"] / "ckpt.pt", config=config)
        (tmp_path / config["out_dir"] / "eval.json").write_text(json.dumps({**EVAL, "kl": 0.1 * len(calls)}))

    monkeypatch.setattr(frontier, "run_training", main)
    monkeypatch.chdir(tmp_path)
    return calls, data, init


def test_a_finished_run_with_the_same_config_is_reused_not_retrained(fake_training):
    calls, _, _ = fake_training
    first = frontier.sweep(["dpo"], [0.1, 0.3], frontier.Path("out"), ["--max_steps=5"])
    assert len(calls) == 2 and [p["kl"] for p in first] == [0.0, 0.1, 0.2]
    again = frontier.sweep(["dpo"], [0.1, 0.3], frontier.Path("out"), ["--max_steps=5"])
    assert len(calls) == 2 and again == first  # nothing trained, the same points read back
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), ["--max_steps=5"], retrain=True)
    assert len(calls) == 3 and calls[-1][:2] == ["--algo=dpo", "--beta=0.1"]


def test_a_changed_setting_or_a_newer_input_trains_again(fake_training):
    calls, data, init = fake_training
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), ["--max_steps=5"])
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), ["--max_steps=6"])  # another step count: not the same run
    assert len(calls) == 2
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), ["--max_steps=6", "--dtype=auto"])  # "auto": set at run time
    assert len(calls) == 2
    later = time.time() + 10
    os.utime(data, (later, later))  # the toy world's data rebuilt after the run: its result is stale
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), ["--max_steps=6"])
    assert len(calls) == 3
    os.utime(init / "ckpt.pt", (later + 10, later + 10))  # so is a run of an older SFT model
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), ["--max_steps=6"])
    assert len(calls) == 4


def test_an_unfinished_run_is_trained(fake_training, tmp_path):
    calls, _, _ = fake_training
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), [])
    (tmp_path / "out" / "dpo_beta0.1" / "eval.json").unlink()  # e.g. killed during its evaluation
    frontier.sweep(["dpo"], [0.1], frontier.Path("out"), [])
    assert len(calls) == 2


def test_default_runs_are_named_by_algo_and_plotted_with_many_algorithms(fake_training, tmp_path):
    calls, _, _ = fake_training
    algos = ["dpo", "cdpo", "robust", "hinge", "rdpo", "dpop", "rpo", "ipo", "kto", "simpo", "cpo", "orpo", "coh"]
    points = frontier.main([f"--algos={','.join(algos)}", "--values=default", "--out=out"])
    assert calls[0] == ["--algo=dpo", "--out_dir=out/dpo_default"]  # no knob on the command line: the defaults
    assert [p["algo"] for p in points] == ["sft", *algos]
    values = {p["algo"]: p["value"] for p in points[1:]}  # the knob's default value, read from the resolved config
    assert values["dpo"] == 0.1 and values["simpo"] == 2.0 and values["orpo"] == 0.1 and values["coh"] == 200
    assert all((tmp_path / "out" / f"{a}_default" / "eval.json").exists() for a in algos)
    pytest.importorskip("matplotlib")
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 1000


def test_sweeps_and_default_runs_share_one_table(fake_training):
    calls, _, _ = fake_training
    points = frontier.main(["--algos=dpo", "--values=0.1,0.3", "--defaults=orpo,coh", "--out=out"])
    assert [(p["algo"], p["value"]) for p in points] == [("sft", ""), ("dpo", 0.1), ("dpo", 0.3), ("orpo", 0.1),
                                                         ("coh", 200)]
    assert calls[-1] == ["--algo=coh", "--out_dir=out/coh_default"]


def test_without_matplotlib_the_csv_and_json_are_written_and_one_line_says_how_to_get_the_png(
        fake_training, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    points = frontier.main(["--algos=dpo", "--values=0.1", "--out=out"])
    out = tmp_path / "out"
    assert json.loads((out / "frontier.json").read_text()) == points and (out / "frontier.csv").exists()
    assert not (out / "frontier.png").exists()
    assert 'no PNG: matplotlib is not installed; pip install -e ".[plot]"' in capsys.readouterr().out
