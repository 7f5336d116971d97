"""nanoalign/toy/overoptimisation.py: rows from run folders, the gold reward's standardisation, binning, the CSV,
on tiny synthetic metrics.jsonl / eval.json files (no training)."""
import csv
import json
import math

import pytest

from nanoalign.toy import overoptimisation as oo

# the SFT model's held-out gold reward: mean 0.5, std 0.2 (se 0.05 over n = 16)
EVAL = {"n": 16, "ref_gold_reward": 0.5, "ref_gold_reward_se": 0.05, "kl": 2.25, "gold_reward": 0.8}


def make_run(root, name, rollouts, kl_coef=0.05, extra_rows=(), eval_result=EVAL):
    """rollouts: (step, kl, scores, monitor or None) -> a run folder with metrics.jsonl and eval.json."""
    run = root / name
    run.mkdir()
    lines = [json.dumps(row) for row in extra_rows]
    for step, kl, scores, monitor in rollouts:
        m = {"step": step, "loss": 0.1, "objective/kl": kl, "objective/kl_coef": kl_coef, "objective/scores": scores}
        if monitor is not None:
            m["objective/monitor_scores"] = monitor
        lines.append(json.dumps(m))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (run / "eval.json").write_text(json.dumps(eval_result))
    return run


def test_proxy_run_rows_read_proxy_from_scores_and_gold_from_the_monitor(tmp_path):
    run = make_run(tmp_path, "p", [(10, -0.01, -0.2, 0.5), (20, 4.0, 1.5, 0.7)],
                   extra_rows=[{"step": 5, "loss": 0.3}])                     # a row without rollout stats: skipped
    rows = oo.read_run(run, "proxy")
    assert [r["source"] for r in rows] == ["rollout", "rollout", "eval"]
    first, second, final = rows
    assert first["sqrt_kl"] == 0.0 and first["kl"] == -0.01                    # negative sampled KL clamps to 0
    assert second["sqrt_kl"] == 2.0 and second["proxy_score"] == 1.5 and second["gold_reward"] == 0.7
    assert second["gold_z"] == pytest.approx((0.7 - 0.5) / 0.2)               # std = se * sqrt(n)
    assert second["kl_coef"] == 0.05 and second["optimised"] == "proxy" and second["run"] == str(run)
    assert final["step"] == 20 and final["kl"] == 2.25 and final["sqrt_kl"] == 1.5 and final["proxy_score"] == ""
    assert final["gold_reward"] == 0.8 and final["gold_z"] == pytest.approx(1.5)


def test_gold_run_has_no_proxy_and_prefers_the_monitor_without_eos_penalty(tmp_path):
    with_monitor = make_run(tmp_path, "g1", [(10, 1.0, 0.4, 0.9)])            # scores = gold - missing-EOS penalty
    without = make_run(tmp_path, "g2", [(10, 1.0, 0.4, None)])
    assert oo.read_run(with_monitor, "gold")[0]["gold_reward"] == 0.9
    assert oo.read_run(without, "gold")[0]["gold_reward"] == 0.4
    assert oo.read_run(with_monitor, "gold")[0]["proxy_score"] == ""


def test_proxy_run_without_gold_monitor_is_an_error_naming_the_line(tmp_path):
    run = make_run(tmp_path, "p", [(10, 1.0, 0.4, 0.6), (20, 2.0, 0.5, None)])
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: no objective/monitor_scores"):
        oo.read_run(run, "proxy")
    with pytest.raises(ValueError, match="optimised"):
        oo.read_run(run, "gold_rm")


def test_binning_pools_runs_of_one_group_by_sqrt_kl(tmp_path):
    a = make_run(tmp_path, "a", [(10, 0.01, 0.1, 0.50), (20, 0.36, 0.5, 0.60), (30, 1.21, 1.0, 0.70)])
    b = make_run(tmp_path, "b", [(10, 0.04, 0.3, 0.54), (20, 0.49, 0.7, 0.64)])
    g = make_run(tmp_path, "g", [(10, 0.09, 0.9, 0.9), (20, 0.16, 0.9, 0.9)])  # the other group: never pooled in
    rows = oo.collect([a, b], [g])
    gold = oo.binned(rows, "proxy", "gold_reward", width=0.5)                 # sqrt(KL): 0.1, 0.2 | 0.6, 0.7 | 1.1
    assert [p["bin"] for p in gold] == [0, 1] and [p["count"] for p in gold] == [2, 2]  # bin 2 has one row: dropped
    assert gold[0]["sqrt_kl"] == pytest.approx(0.15) and gold[0]["mean"] == pytest.approx(0.52)
    assert gold[0]["se"] == pytest.approx(0.02)                              # values 0.50, 0.54: sd 0.0283 / sqrt(2)
    proxy = oo.binned(rows, "proxy", "proxy_score", width=0.5, min_count=1)
    assert [p["mean"] for p in proxy] == pytest.approx([0.2, 0.6, 1.0]) and math.isnan(proxy[2]["se"])
    assert oo.binned(rows, "gold", "proxy_score", width=0.5) == []            # gold runs have no proxy score
    assert [p["mean"] for p in oo.binned(rows, "gold", "gold_reward", width=0.5)] == pytest.approx([0.9])


def test_main_writes_the_csv_from_glob_patterns(tmp_path, capsys):
    for name, kl in (("ppo_kl_coef0.01", 4.0), ("ppo_kl_coef0.2", 1.0)):
        make_run(tmp_path, name, [(10, kl / 4, 0.2, 0.55), (20, kl, 0.9, 0.75)])
    make_run(tmp_path, "gold_run", [(10, 1.0, 0.6, 0.6)])
    out = tmp_path / "overopt"
    rows = oo.main([f"--proxy={tmp_path}/ppo_kl_coef*", f"--gold={tmp_path}/gold_run", f"--out={out}"])
    assert len(rows) == 2 * 3 + 2
    with open(out / "overopt.csv") as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == oo.COLUMNS and len(table) == len(rows)
    assert [r["run"].rsplit("/", 1)[-1] for r in table[::3][:2]] == ["ppo_kl_coef0.01", "ppo_kl_coef0.2"]
    assert float(table[1]["sqrt_kl"]) == 2.0 and table[-1]["optimised"] == "gold"
    assert "PPO on the proxy reward" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no run folders"):
        oo.main([f"--proxy={tmp_path}/nothing*", "--gold=", f"--out={out}"])
