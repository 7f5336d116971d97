"""The listwise algorithms end to end: LiPO's cached reference equals the live one (first loss = sum Delta log 2),
two steps of each on a small file, and (integration) the toy world's listwise stage and `train.py --algo=...` on it."""
import contextlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from nanoalign.algos import algo_config, get_algorithm
from nanoalign.algos.lipo import LiPO, lambda_weights
from nanoalign.config import load_config
from nanoalign.data import read_jsonl
from nanoalign.loading import build_policy
from nanoalign.toy.pipeline import RECIPES, prepare
from nanoalign.trainer import Context
from train import main as train_main

CPU = torch.device("cpu")
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()
LISTWISE = ("pro", "rrhf", "lipo")


@pytest.fixture(scope="module")
def list_file(tmp_path_factory):
    """21 lists of 2-4 distinct completions with random scores (some tied, none fully tied)."""
    rng = random.Random(0)
    rows = []
    while len(rows) < 21:
        k = rng.randint(2, 4)
        completions = list(dict.fromkeys(" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
                                         for _ in range(k)))
        scores = [rng.choice([0.0, 0.5, 1.0]) for _ in completions]
        if len(completions) >= 2 and len(set(scores)) > 1:
            rows.append({"prompt": rng.choice(WORDS), "completions": completions, "scores": scores})
    path = tmp_path_factory.mktemp("data") / "lists.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_args(data, out_dir, **kw):
    args = dict(algo="lipo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2,
                n_embd=32, block_size=96, max_len=80, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=1,
                max_steps=2, log_interval=1, dtype="float32", dropout=0.0, seed=3)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def build(algorithm_cls, *args):
    cfg = load_config(list(args), algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, 1, contextlib.nullcontext)
    return algorithm_cls(cfg, policy, tokenizer, ctx), policy


def test_lipo_precomputed_reference_equals_live_and_first_loss_is_sum_delta_log_2(list_file, tmp_path):
    cached, policy = build(LiPO, *tiny_args(list_file, tmp_path))
    live, _ = build(LiPO, *tiny_args(list_file, tmp_path, ref_logps="live"))
    assert cached.reference is None and live.reference.frozen is not None
    batch = cached.collate(cached.examples[:4])
    live_ref = live.reference_logps(live.collate(live.examples[:4]))
    for name in cached.ref_names:
        torch.testing.assert_close(batch[name], live_ref[name], rtol=1e-6, atol=1e-5)
    loss, metrics = cached.loss(policy, batch)  # pi = pi_ref: every s = 0, each ordered pair costs Delta log 2
    scores, valid = batch["scores"], batch["valid"]
    delta = lambda_weights(torch.zeros_like(scores), scores, valid)
    better = (scores[:, :, None] > scores[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    expected = (delta * better).sum((-2, -1)).mean() * math.log(2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5) and metrics["rewards/margins"] == 0
    assert live.loss(live.policy, live.collate(live.examples[:4]))[0].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("algo", LISTWISE)
def test_every_listwise_algorithm_runs_two_steps_and_logs_its_metrics(algo, list_file, tmp_path):
    out = train_main(tiny_args(list_file, tmp_path / algo, algo=algo, eval_data=list_file, eval_interval=2,
                               eval_batches=2))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    expected = {"rewards/accuracies", "rewards/margins", "rewards/best", "rewards/worst", "logps/best", "logps/worst"}
    expected |= {"nll_loss", "ranking_loss"} if algo != "lipo" else set()
    assert expected <= records[-1].keys() and {f"eval/{k}" for k in expected} <= records[-1].keys()


@pytest.mark.integration
def test_the_listwise_stage_is_built_only_for_listwise_runs_and_reuses_the_annotation_samples(tmp_path, monkeypatch):
    """On the tiny world: a DPO run builds no listwise/; a PRO run builds lists.jsonl from the annotation prompts
    (listwise_k samples each, the same samples as annotations/ when listwise_k = completions_per_prompt), and
    train.py --algo=pro/rrhf/lipo trains on it and writes eval.json."""
    monkeypatch.setenv("NANOALIGN_TOY_DIR", str(tmp_path / "toy"))
    monkeypatch.setenv("NANOALIGN_TOY_RECIPE", "tiny")
    tiny = RECIPES["tiny"]
    _, timings = prepare(load_config(["--algo=dpo", "--dtype=float32"], algo_config), get_algorithm("dpo"), tiny)
    assert "listwise" not in timings and not (tmp_path / "toy/listwise").exists()
    cfg, timings = prepare(load_config(["--algo=pro", "--dtype=float32"], algo_config), LiPO, tiny)
    assert timings["listwise"] is not None and cfg.data == str(tmp_path / "toy/listwise/lists.jsonl")
    rows = read_jsonl(cfg.data, "listwise")
    prompts = [r["prompt"] for r in read_jsonl(tmp_path / "toy/annotations/prompts.jsonl", "prompt")]
    assert [r["prompt"] for r in rows] == [p for p in prompts if p in {r["prompt"] for r in rows}]
    assert all(2 <= len(r["completions"]) <= tiny.listwise_k for r in rows)
    answers = {(r["prompt"], c) for r in read_jsonl(tmp_path / "toy/annotations/binary.jsonl", "binary")
               for c in [r["completion"]]}
    assert {(r["prompt"], c) for r in rows for c in r["completions"]} <= answers  # k = 3 = completions_per_prompt
    stamp = json.loads((tmp_path / "toy/listwise/stamp.json").read_text())
    assert stamp["lists"] == len(rows) and stamp["completions"] == sum(len(r["completions"]) for r in rows)
    for algo in LISTWISE:
        out = train_main([f"--algo={algo}", "--max_steps=2", "--batch_size=8", "--micro_batch_size=8",
                          "--dtype=float32", f"--out_dir={tmp_path / algo}"])
        result = json.loads((Path(out) / "eval.json").read_text())
        assert result["algo"] == algo and result["n"] == tiny.n_eval and isinstance(result["kl"], float)
    assert prepare(load_config(["--algo=lipo", "--dtype=float32"], algo_config), LiPO, tiny)[1]["listwise"] is None
