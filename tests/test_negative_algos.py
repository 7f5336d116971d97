"""The adapters of --algo=npo, tdpo, dro, cringe and PPO-ptx: which rows they use (and count), their first losses at
policy == reference, what the value network reads, the pretraining micro-batches of PPO-ptx, bad input, 2-step runs,
and (integration) train.py on the tiny toy world."""
import contextlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from nanoalign.algos import algo_config
from nanoalign.algos.cringe import CRINGE
from nanoalign.algos.dpo import DPO
from nanoalign.algos.dro import DRO
from nanoalign.algos.npo import NPO
from nanoalign.algos.ppo import PPO
from nanoalign.algos.sft import sft_loss
from nanoalign.algos.tdpo import TDPO
from nanoalign.config import load_config
from nanoalign.data import collate, tokenize_binary
from nanoalign.loading import build_policy
from nanoalign.logps import batch_logps
from nanoalign.toy.pipeline import RECIPES, prepare
from nanoalign.trainer import Context
from train import main as train_main

CPU = torch.device("cpu")
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()


def phrase(rng):
    return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """binary.jsonl (40 rows, 12 desirable), prefs.jsonl (24 pairs), prompts.jsonl (24), text.jsonl (40)."""
    rng, root = random.Random(0), tmp_path_factory.mktemp("data")
    rows = {"binary": [{"prompt": phrase(rng).strip(), "completion": phrase(rng), "label": i % 10 < 3}
                       for i in range(40)],
            "prefs": [{"prompt": phrase(rng).strip(), "chosen": phrase(rng), "rejected": phrase(rng)}
                      for _ in range(24)],
            "prompts": [{"prompt": phrase(rng).strip()} for _ in range(24)],
            "text": [{"text": phrase(rng).strip()} for _ in range(40)]}
    for name, data in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    return root


def tiny_args(data, out_dir, **kw):
    args = dict(algo="npo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="toy", n_layer=1, n_head=2,
                n_embd=32, block_size=64, max_len=64, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=1,
                max_steps=2, log_interval=1, dtype="float32", dropout=0.0, seed=3)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def build(algorithm_cls, args, logs=None):
    cfg = load_config(args, algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, cfg.batch_size // cfg.micro_batch_size, contextlib.nullcontext)
    algo_cls = type("Logged", (algorithm_cls,), {"log": lambda self, *a: logs.append(" ".join(map(str, a)))}) \
        if logs is not None else algorithm_cls
    return algo_cls(cfg, policy, tokenizer, ctx)


# ----------------------------------------------------------------------------------------------- NPO

def test_npo_uses_undesirable_rows_and_counts_the_unused_desirable_ones(files, tmp_path):
    """retain_weight 0: the 28 undesirable rows are the forget set, the 12 desirable ones are dropped and logged;
    at policy == reference every row's loss is (2/beta) log 2. retain_weight 1 keeps all 40 and adds the mean of
    the desirable rows' summed NLL (the paper's L_RT); nll_loss logs its token mean."""
    logs = []
    plain = build(NPO, tiny_args(files / "binary.jsonl", tmp_path, retain_weight=0), logs)
    assert len(plain.examples) == 28 and not any(e["label"] for e in plain.examples)
    assert any("28 undesirable rows" in line and "12 desirable rows not used" in line for line in logs)
    loss, metrics = plain.loss(plain.policy, plain.collate(plain.examples[:4]))
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6) and metrics["rewards/rejected"] == 0
    assert "nll_loss" not in metrics

    rt = build(NPO, tiny_args(files / "binary.jsonl", tmp_path, beta=0.5))
    assert len(rt.examples) == 40
    batch = rt.collate([e for e in rt.examples if e["label"]][:2] + [e for e in rt.examples if not e["label"]][:2])
    loss, metrics = rt.loss(rt.policy, batch)
    logps, counts, _ = batch_logps(rt.policy, batch["input_ids"], batch["loss_mask"])
    retain = -logps[:2].mean()  # L_RT: the mean summed NLL of the two desirable rows (the paper's scale)
    assert loss.item() == pytest.approx(2 / 0.5 * math.log(2) + retain.item(), rel=1e-5)
    assert metrics["nll_loss"].item() == pytest.approx(sft_loss(logps[:2], counts[:2]).item(), rel=1e-5)  # logged


def test_npo_without_undesirable_rows_is_a_clear_error(files, tmp_path):
    path = tmp_path / "thumbs_up.jsonl"
    path.write_text("".join(json.dumps({"prompt": "the film", "completion": f" was {w} .", "label": True}) + "\n"
                            for w in ("good", "great", "fine")))
    with pytest.raises(ValueError, match="npo needs undesirable answers .* all 3 rows are desirable"):
        build(NPO, tiny_args(path, tmp_path))


def test_npo_reads_a_preference_file_as_unpaired_rows(files, tmp_path):
    """Like KTO: chosen -> desirable (retain), rejected -> undesirable (forget)."""
    npo = build(NPO, tiny_args(files / "prefs.jsonl", tmp_path, retain_weight=0))
    assert len(npo.examples) == 24


def test_bad_binary_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": " b", "label": true}\n{"prompt": "a", "completion": " b"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'label'"):
        build(NPO, tiny_args(path, tmp_path))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'label'"):
        build(DRO, tiny_args(path, tmp_path, algo="dro"))


# ---------------------------------------------------------------------------------------------- TDPO

def test_tdpo_first_loss_is_log_2_and_the_sequential_kl_grows_as_the_policy_moves(files, tmp_path):
    tdpo = build(TDPO, tiny_args(files / "prefs.jsonl", tmp_path, algo="tdpo"))
    batch = tdpo.collate(tdpo.examples[:4])
    loss, metrics = tdpo.loss(tdpo.policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert abs(metrics["seqkl/chosen"]) < 1e-6 and abs(metrics["seqkl/rejected"]) < 1e-6
    with torch.no_grad():  # the reference is a frozen copy: moving the policy moves the KL, not pi_ref
        tdpo.policy.lm_head.weight.add_(0.3 * torch.randn_like(tdpo.policy.lm_head.weight))
    _, moved = tdpo.loss(tdpo.policy, batch)
    assert moved["seqkl/chosen"] > 1e-3 and moved["seqkl/rejected"] > 1e-3


def test_tdpo_alpha_zero_adapter_equals_dpo_adapter(files, tmp_path):
    """The reduction through the adapters: TDPO2 with alpha 0 and live DPO give the same loss on a moved policy."""
    tdpo = build(TDPO, tiny_args(files / "prefs.jsonl", tmp_path, algo="tdpo", tdpo_alpha=0))
    dpo = build(DPO, tiny_args(files / "prefs.jsonl", tmp_path, algo="dpo", ref_logps="live"))
    with torch.no_grad():
        for model in (tdpo.policy, dpo.policy):  # the same move of the same initial weights
            torch.manual_seed(1)
            model.lm_head.weight.add_(0.3 * torch.randn_like(model.lm_head.weight))
    batch = tdpo.collate(tdpo.examples[:4])
    assert tdpo.loss(tdpo.policy, batch)[0].item() == pytest.approx(dpo.loss(dpo.policy, batch)[0].item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------- DRO

def test_dro_rewards_from_labels_and_the_value_reads_the_prompt_only(files, tmp_path):
    """r = 1 / 0 from the label; at policy == reference the log-ratio is 0; V(x) is read at the last prompt token,
    so two answers to one prompt get the same value whatever their words and lengths."""
    dro = build(DRO, tiny_args(files / "binary.jsonl", tmp_path, algo="dro"))
    assert [e["reward"] for e in dro.examples[:4]] == [1.0, 1.0, 1.0, 0.0]
    loss, metrics = dro.loss(dro.module, dro.collate(dro.examples[:4]))
    assert abs(metrics["logratio/mean"]) < 1e-5 and math.isfinite(loss.item())
    rows = [{"prompt": "the film", "completion": c, "label": True} for c in (" was good", " was very dull and bad")]
    examples, _ = tokenize_binary(rows, dro.tokenizer, 64)
    batch = collate(examples, dro.tokenizer.pad_id)
    _, values = dro.module(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    assert values[0].item() == pytest.approx(values[1].item(), abs=1e-6)
    assert dro.state_dict() == {"policy_prefix": "policy."}


# -------------------------------------------------------------------------------------------- CRINGE

def test_cringe_puts_cross_entropy_on_positive_rows_and_the_contrast_on_negative_rows(files, tmp_path):
    """Only desirable rows: the loss is their token-mean NLL; only undesirable rows: alpha times the mean contrast,
    the same on a second call (y+ seeded by the batch) and never NaN."""
    cringe = build(CRINGE, tiny_args(files / "binary.jsonl", tmp_path, algo="cringe", cringe_alpha=2.0))
    good = cringe.collate([e for e in cringe.examples if e["label"]][:4])
    loss, metrics = cringe.loss(cringe.policy, good)
    logps, counts, _ = batch_logps(cringe.policy, good["input_ids"], good["loss_mask"])
    assert loss.item() == pytest.approx(sft_loss(logps, counts).item(), rel=1e-5) and metrics["cringe_loss"] == 0
    bad = cringe.collate([e for e in cringe.examples if not e["label"]][:4])
    loss, metrics = cringe.loss(cringe.policy, bad)
    assert metrics["nll_loss"] == 0 and loss.item() == pytest.approx(2.0 * metrics["cringe_loss"].item(), rel=1e-6)
    assert cringe.loss(cringe.policy, bad)[0].item() == loss.item() and math.isfinite(loss.item())


# -------------------------------------------------------------------------------------------- PPO-ptx

def test_ppo_ptx_adds_gamma_times_the_pretraining_nll(files, tmp_path):
    """Each rollout micro-batch carries a micro-batch of the text file; the loss grows by ptx_coef times its
    token-mean NLL under the policy; ptx_coef 0 draws no text; ptx_coef > 0 without ptx_data is an error."""
    args = dict(algo="ppo", reward_model="gold", max_new_tokens=8, rollout_batch_size=8, epochs=1)
    ptx = build(PPO, tiny_args(files / "prompts.jsonl", tmp_path, ptx_coef=0.5, ptx_data=files / "text.jsonl", **args))
    batch = next(ptx.batches(0))
    assert batch["ptx_input_ids"].shape[0] == 4 and {"ptx_loss_mask", "ptx_attention_mask"} <= batch.keys()
    loss, metrics = ptx.loss(ptx.module, batch)
    logps, counts, _ = batch_logps(ptx.policy, batch["ptx_input_ids"], batch["ptx_loss_mask"],
                                   batch["ptx_attention_mask"])
    assert metrics["ptx/nll_loss"].item() == pytest.approx(sft_loss(logps, counts).item(), rel=1e-5)
    plain = {k: v for k, v in batch.items() if not k.startswith("ptx_")}
    without, _ = ptx.loss(ptx.module, plain)
    assert loss.item() == pytest.approx(without.item() + 0.5 * metrics["ptx/nll_loss"].item(), rel=1e-5)
    off = build(PPO, tiny_args(files / "prompts.jsonl", tmp_path, **args))
    assert "ptx_input_ids" not in next(off.batches(0))
    with pytest.raises(ValueError, match="ptx_coef > 0 needs ptx_data"):
        build(PPO, tiny_args(files / "prompts.jsonl", tmp_path, ptx_coef=0.5, **args))


def test_ppo_ptx_texts_continue_where_a_resumed_run_left_off(files, tmp_path):
    """The pretraining micro-batches of a run resumed at step s are those the straight run drew from step s on."""
    args = tiny_args(files / "prompts.jsonl", tmp_path, algo="ppo", reward_model="gold", max_new_tokens=8,
                     rollout_batch_size=8, epochs=1, ptx_coef=0.5, ptx_data=files / "text.jsonl")
    algo = build(PPO, args)  # batch 8, micro 4: 2 micro-batches per step, 1 step per rollout
    straight = algo.batches(0)
    texts = [next(straight)["ptx_input_ids"] for _ in range(4)]
    resumed = build(PPO, args).batches(1)
    assert all(torch.equal(next(resumed)["ptx_input_ids"], t) for t in texts[2:])


# ------------------------------------------------------------------------------------------ 2-step runs

@pytest.mark.parametrize("algo,data,extra", [
    ("npo", "binary", {}), ("npo", "binary", {"loss_type": "ga", "retain_weight": 0}),
    ("tdpo", "prefs", {}), ("tdpo", "prefs", {"tdpo_variant": "tdpo1"}), ("dro", "binary", {}),
    ("cringe", "binary", {}),
    ("ppo", "prompts", {"reward_model": "gold", "max_new_tokens": 8, "rollout_batch_size": 8, "ptx_coef": 1.0,
                        "ptx_data": "text.jsonl"})])
def test_two_step_runs_log_finite_losses(algo, data, extra, files, tmp_path):
    extra = {k: files / v if k == "ptx_data" else v for k, v in extra.items()}
    out = train_main(tiny_args(files / f"{data}.jsonl", tmp_path / algo, algo=algo, **extra))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)


@pytest.mark.integration
@pytest.mark.parametrize("algo", ["npo", "tdpo", "dro", "cringe"])
def test_train_py_on_the_tiny_toy_world(algo, tiny_toy, tmp_path, monkeypatch):
    """python train.py --algo=<algo> on the tiny toy world: the data of its format, the SFT model, eval.json."""
    monkeypatch.setenv("NANOALIGN_TOY_DIR", str(tiny_toy))
    monkeypatch.setenv("NANOALIGN_TOY_RECIPE", "tiny")
    out = train_main([f"--algo={algo}", "--max_steps=2", "--batch_size=8", "--micro_batch_size=8",
                      "--dtype=float32", f"--out_dir={tmp_path / 'run'}"])
    result = json.loads((Path(out) / "eval.json").read_text())
    assert result["algo"] == algo and isinstance(result["kl"], float) and result["n"] == RECIPES["tiny"].n_eval


@pytest.mark.integration
def test_ppo_ptx_on_the_tiny_toy_world_gets_the_corpus(tiny_toy, tmp_path, monkeypatch):
    """prepare() fills ptx_data with the toy corpus when ptx_coef > 0 (and leaves it empty when off)."""
    monkeypatch.setenv("NANOALIGN_TOY_DIR", str(tiny_toy))
    monkeypatch.setenv("NANOALIGN_TOY_RECIPE", "tiny")
    cfg, _ = prepare(load_config(["--algo=ppo", "--reward_model=gold", "--ptx_coef=1", "--dtype=float32"],
                                 algo_config), PPO, RECIPES["tiny"])
    assert cfg.ptx_data == str(tiny_toy / "corpus" / "pretrain.jsonl")
    off, _ = prepare(load_config(["--algo=ppo", "--reward_model=gold", "--dtype=float32"], algo_config), PPO,
                     RECIPES["tiny"])
    assert off.ptx_data == ""
    out = train_main(["--algo=ppo", "--reward_model=gold", "--ptx_coef=1", "--max_steps=2", "--batch_size=8",
                      "--micro_batch_size=8", "--rollout_batch_size=8", "--dtype=float32",
                      f"--out_dir={tmp_path / 'run'}"])
    with open(Path(out) / "metrics.jsonl") as f:
        assert "ptx/nll_loss" in json.loads(f.readline())
