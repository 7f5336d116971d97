"""Reward model and PPO adapters, and the shared rollout module.

The pure math (GAE, KL estimators, clipped losses and their zero gradients, KL controllers) is tested in
tests/test_rl_math.py; here: where PPO's adapter puts the score and what padding receives, the rollout's layout and
log-probs, the reward model's head position, loss and normalisation, 2-step runs of --algo=rm and --algo=ppo, and
(slow) the reward model's accuracy on held-out toy-world pairs.
"""
import contextlib
import json
import math
import random

import pytest
import torch

from nanoalign.algos.ppo import PPO, ppo_targets
from nanoalign.algos.rm import reward_loss
from nanoalign.loading import load_reward_model
from nanoalign.model import RewardModel, last_token_index
from nanoalign.reference import Reference
from nanoalign.loading import load_model
from nanoalign.config import load_config
from nanoalign.model import GPT, GPTConfig
from nanoalign.rollout import generate_rollout, minibatches, response_logps
from nanoalign.scorers import RewardModelScorer
from nanoalign.toy import gold_scorer
from nanoalign.tokenizer import get_tokenizer
from nanoalign.loading import build_policy
from nanoalign.trainer import Context
from nanoalign.algos import algo_config
from train import main as train_main

TOK = get_tokenizer("toy")
CPU = torch.device("cpu")
PROMPTS = ["the plot was", "i would", "this movie made me", "the acting", "overall the film", "honestly it",
           "the music was", "i loved"]
PAIRS = [("the plot was", " great .", " dull ."), ("i would", " recommend it .", " not recommend it ."),
         ("the acting", " was superb .", " was awful ."), ("this movie made me", " laugh .", " yawn .")]


def tiny_gpt(seed=0, eos_bias=0.0, **kw):
    """A random 1-layer GPT on the toy tokenizer; eos_bias > 0 makes EOS likely (so responses end at varied lengths)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=TOK.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32, **kw))
    if eos_bias:
        with torch.no_grad():  # h_0 = 1 exactly (final norm: weight 0, bias 1), so logit_eos = eos_bias
            model.norm_f.weight[0], model.norm_f.bias[0] = 0.0, 1.0
            model.lm_head.weight[TOK.eos_id] = 0.0
            model.lm_head.weight[TOK.eos_id, 0] = eos_bias
    return model.eval()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    (root / "prefs.jsonl").write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n"
                                              for p, c, r in PAIRS * 2))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    return root


def tiny_args(**kw):
    args = dict(init_from="scratch", tokenizer="toy", n_layer=1, n_head=2, n_embd=32, block_size=64, max_len=64,
                max_steps=2, batch_size=4, micro_batch_size=2, lr=1e-3, warmup_steps=1, log_interval=1,
                dtype="float32", seed=0)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


# ------------------------------------------------------------------------------------------------- PPO adapter
def test_score_lands_on_the_eos_token_and_padding_gets_nothing():
    """Row 0 has 3 valid tokens ending in EOS, row 1 has 5 without EOS (cut), row 2 has 1. With pi == pi_ref the KL
    part is 0, so the rewards are exactly: score at the last valid token (row 1: 0.7 - penalty 1 = -0.3), 0 elsewhere.
    GAE with V = 0, gamma = 1, lambda = 1 gives A_t = sum of future rewards = the row's score on every valid token."""
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    logp = torch.randn(3, 5) * mask
    t = ppo_targets(torch.tensor([2.0, 0.7, -1.0]), torch.tensor([True, False, True]), logp, logp.clone(),
                    torch.zeros(3, 5), mask, kl_coef=0.1, missing_eos_penalty=1.0, lam=1.0, whiten_advantages=False)
    expected = torch.zeros(3, 5)
    expected[0, 2], expected[1, 4], expected[2, 0] = 2.0, -0.3, -1.0
    assert torch.allclose(t["rewards"], expected)
    assert torch.allclose(t["advantages"], torch.tensor([2.0, -0.3, -1.0])[:, None] * mask)
    assert torch.allclose(t["returns"], t["advantages"])  # V = 0


def test_kl_penalty_on_every_valid_token_and_whitened_advantages_ignore_padding():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.float32)
    logp, ref = torch.randn(2, 3), torch.randn(2, 3)
    values = torch.randn(2, 3)
    t = ppo_targets(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), logp, ref, values, mask, kl_coef=0.5)
    kl = (logp - ref) * mask                                       # k1 on valid tokens
    assert torch.allclose(t["non_score_reward"], -0.5 * kl)
    assert (t["rewards"][mask == 0] == 0).all() and (t["advantages"][mask == 0] == 0).all()
    valid = t["advantages"][mask.bool()]
    assert abs(valid.mean().item()) < 1e-5 and abs(valid.std().item() - 1) < 1e-4  # whitened over valid tokens only
    garbage = ppo_targets(torch.tensor([1.0, 2.0]), torch.tensor([True, True]), logp + 9 * (1 - mask), ref,
                          values + 5 * (1 - mask), mask, kl_coef=0.5)
    assert torch.allclose(garbage["advantages"], t["advantages"]) and torch.allclose(garbage["returns"], t["returns"])


def build_ppo(data, tmp_path, **kw):
    args = tiny_args(algo="ppo", data=data / "prompts.jsonl", out_dir=tmp_path, reward_model="gold",
                     rollout_batch_size=8, max_new_tokens=8, epochs=2, **kw)
    cfg = load_config(args, algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    return PPO(cfg, policy, tokenizer, Context(CPU, 0, 1, cfg.micro_batch_size, 2, contextlib.nullcontext))


def padded_batch(seed=0):
    """4 rows: left-padded prompts of 2-4 tokens, responses of 1-5 tokens ending in EOS, then padding."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens, response_lens = [2, 4, 3, 4], [5, 1, 3, 2]
    P, R = 4, 5
    ids = torch.full((4, P + R), TOK.pad_id)
    attn = torch.zeros(4, P + R, dtype=torch.long)
    mask = torch.zeros(4, R)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        ids[i, P - p:P + r] = torch.randint(0, 800, (p + r,), generator=g)
        ids[i, P + r - 1] = TOK.eos_id
        attn[i, P - p:P + r], mask[i, :r] = 1, 1
    rows = {"input_ids": ids, "attention_mask": attn, "response_mask": mask,
            "logprobs": -torch.rand(4, R, generator=g) * mask, "values": torch.randn(4, R, generator=g) * mask,
            "advantages": torch.randn(4, R, generator=g) * mask, "returns": torch.randn(4, R, generator=g) * mask}
    return rows


@pytest.mark.parametrize("critic", ["separate", "head"])
def test_ppo_loss_never_reads_padding(data, tmp_path, critic):
    """Through the adapter (ActorCritic forward + PPO.loss): tokens, old log-probs, values, advantages and returns at
    padded positions (left prompt padding, after EOS) can be anything; the loss and its gradients do not change."""
    algo = build_ppo(data, tmp_path, critic=critic)
    batch = padded_batch()
    loss, metrics = algo.loss(algo.module, batch)
    loss.backward()
    grads = [p.grad.clone() for p in algo.module.parameters() if p.grad is not None]
    algo.module.zero_grad()
    junk = dict(batch)
    pad = batch["attention_mask"] == 0
    junk["input_ids"] = torch.where(pad, torch.randint(0, 800, pad.shape), batch["input_ids"])
    for k in ("logprobs", "values", "advantages", "returns"):
        junk[k] = torch.where(batch["response_mask"].bool(), batch[k], torch.full_like(batch[k], 7.0))
    loss2, _ = algo.loss(algo.module, junk)
    loss2.backward()
    assert torch.allclose(loss, loss2, atol=1e-6)
    assert all(torch.allclose(a, p.grad, atol=1e-6) for a, p in zip(grads, (p for p in algo.module.parameters()
                                                                              if p.grad is not None)))
    for name in ("policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg", "val/clipfrac_avg"):
        assert name in metrics


def test_ppo_rollout_rows_and_first_ratio_is_one(data, tmp_path):
    """A rollout gives rollout_batch_size rows; before any update the policy's log-probs in loss() equal the rollout's
    (ratio 1, nothing clipped); minibatches cover the rollout `epochs` times."""
    algo = build_ppo(data, tmp_path)
    stream = algo.batches(0)
    first = next(stream)
    assert first["input_ids"].shape[0] == 2 and algo.rollout_metrics["objective/scores"].dim() == 0
    _, metrics = algo.loss(algo.module, first)
    assert abs(metrics["val/ratio"].item() - 1) < 1e-5 and metrics["policy/clipfrac_avg"].item() == 0
    assert metrics["policy/approxkl_avg"].item() < 1e-10
    first_rollout = algo.rollout_metrics
    rest = [next(stream) for _ in range(8 // 2 * 2 - 1)]  # rollout of 8 rows, micro-batch 2, 2 epochs
    assert algo.rollout_metrics is first_rollout  # still the same rollout
    seen = torch.cat([b["input_ids"] for b in [first] + rest])
    assert seen.shape[0] == 16 and len({tuple(r.tolist()) for r in seen}) <= 8
    assert algo.steps_per_rollout == 8 // 4 * 2


# --------------------------------------------------------------------------------------------------- rollout
def test_rollout_layout_logprobs_reference_and_scores():
    policy, reference = tiny_gpt(0, eos_bias=3.7), tiny_gpt(1)  # P(EOS) ~ 0.2 per token at temperature 0.7
    prompt_ids = [TOK.encode(p) for p in PROMPTS[:3]]
    g = torch.Generator().manual_seed(0)
    r = generate_rollout(policy, TOK, prompt_ids, 3, 10, gold_scorer, temperature=0.7,
                         reference=Reference(reference, copy=False),
                         batch_size=4, generator=g)  # 9 rows in 3 generate calls of different widths
    assert len(r) == 9 and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    lengths = r.response_mask.sum(1)
    assert len(set(lengths.tolist())) > 1 and r.eos.any()  # ragged responses, some ended by EOS
    P = r.prompt_len
    for i in range(9):
        n, p = int(lengths[i]), len(prompt_ids[r.prompt_index[i]])
        assert r.input_ids[i, P - p:P].tolist() == prompt_ids[r.prompt_index[i]]     # left-padded prompt
        assert r.attention_mask[i].tolist() == [0] * (P - p) + [1] * (p + n) + [0] * (r.response_mask.shape[1] - n)
        assert (r.input_ids[i, P + n:] == TOK.pad_id).all()                          # padding after the response
        assert bool(r.eos[i]) == (r.input_ids[i, P + n - 1] == TOK.eos_id)
    assert torch.allclose(response_logps(policy, r, 0.7), r.logprobs, atol=1e-5)   # temperature-scaled, same layout
    assert torch.allclose(response_logps(reference, r, 0.7), r.ref_logprobs, atol=1e-5)
    assert torch.allclose(r.scores, gold_scorer(r.prompts, r.responses))
    assert r.prompts[0] == PROMPTS[0] and all(TOK.decode(TOK.encode(t)) == t for t in r.responses)


def test_minibatches_reshuffle_every_epoch_and_cover_every_row():
    rows = {"x": torch.arange(12), "y": torch.arange(12) * 10}
    batches = list(minibatches(rows, 4, epochs=3, generator=torch.Generator().manual_seed(0)))
    assert len(batches) == 9 and all((b["y"] == b["x"] * 10).all() for b in batches)  # rows stay together
    epochs = [torch.cat([b["x"] for b in batches[e * 3:e * 3 + 3]]) for e in range(3)]
    assert all(sorted(e.tolist()) == list(range(12)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1]) or not torch.equal(epochs[1], epochs[2])


# ------------------------------------------------------------------------------------------------ reward model
def test_reward_loss_by_hand():
    """r_c = 1, r_r = 0: -log sigmoid(1) = log(1 + e^-1) = 0.31326; margin 1: -log sigmoid(0) = log 2;
    centring c = 0.1 adds 0.1 * (1 + 0)^2 = 0.1."""
    c, r = torch.tensor([1.0]), torch.tensor([0.0])
    assert reward_loss(c, r).item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert reward_loss(c, r, margin=torch.tensor([1.0])).item() == pytest.approx(math.log(2), abs=1e-6)
    assert reward_loss(c, r, center_coef=0.1).item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.1, abs=1e-6)


@pytest.mark.parametrize("readout", ["eos", "sum"])
def test_reward_model_reads_the_last_real_token_whatever_the_padding(readout):
    rm = RewardModel(tiny_gpt(0), readout).eval()
    seqs = [TOK.encode("the plot was great .") + [TOK.eos_id], TOK.encode("i would not") + [TOK.eos_id]]
    alone = torch.stack([rm(torch.tensor([s]))[0] for s in seqs])
    T = 12
    right = torch.full((2, T), TOK.pad_id)
    left = torch.full((2, T), 7)  # another padding token: it must not matter either
    right_mask, left_mask = torch.zeros(2, T, dtype=torch.long), torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        right[i, :len(s)], right_mask[i, :len(s)] = torch.tensor(s), 1
        left[i, T - len(s):], left_mask[i, T - len(s):] = torch.tensor(s), 1
    assert last_token_index(right_mask).tolist() == [len(seqs[0]) - 1, len(seqs[1]) - 1]
    assert torch.allclose(rm(right, right_mask), alone, atol=1e-5)
    assert torch.allclose(rm(left, left_mask), alone, atol=1e-5)
    h = rm.backbone.hidden_states(torch.tensor([seqs[1]]))  # (1, T, C) hidden states, by hand
    by_hand = rm.head(h[0, -1]) if readout == "eos" else rm.head(h[0]).sum()  # EOS position, or every token
    assert rm(right, right_mask)[1].item() == pytest.approx(by_hand.item(), abs=1e-4)


@pytest.mark.parametrize("readout", ["eos", "sum"])
def test_fold_normalisation_keeps_the_outputs(readout):
    rm = RewardModel(tiny_gpt(0), readout).eval()
    ids = torch.tensor([TOK.encode("the plot was great .")])
    rm.normalise(0.3, 2.0)
    before = rm.token_values(ids)
    rm.fold_normalisation()
    assert rm.reward_std.item() == 1 and rm.reward_mean.item() == (0 if readout == "eos" else pytest.approx(0.15))
    assert torch.allclose(rm.token_values(ids), before, atol=1e-5)


# -------------------------------------------------------------------------------------------- 2-step CLI runs
def test_rm_and_ppo_two_step_runs(data, tmp_path):
    """--algo=rm: the saved model's rewards on its reference samples (the training completions) have mean 0, std 1.
    --algo=ppo against that checkpoint (critic from the RM) and against the gold reward (value head, k3, adaptive
    beta): TRL's metric names are logged, and the checkpoint loads as a policy."""
    rm_dir = train_main(tiny_args(algo="rm", data=data / "prefs.jsonl", out_dir=tmp_path / "rm"))
    log = [json.loads(line) for line in (rm_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and {"accuracy", "margin", "rewards/mean", "rewards/std"} <= set(log[-1])
    rm, tok = load_reward_model(f"ckpt:{rm_dir}")
    prompts = [p for p, _, _ in PAIRS * 2] * 2                  # the 16 training completions, the reference samples
    scores = RewardModelScorer(rm, tok)(prompts, [c for _, c, _ in PAIRS * 2] + [r for _, _, r in PAIRS * 2])
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std().item() - 1) < 1e-4
    with pytest.raises(ValueError, match="reward model"):
        load_model(f"ckpt:{rm_dir}")

    names = {"objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
             "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "loss/policy_avg", "loss/value_avg",
             "val/clipfrac_avg", "val/num_eos_tokens", "time/data_s", "time/update_s"}
    for name, extra in (("proxy", dict(reward_model=f"ckpt:{rm_dir}", monitor_reward="gold")),
                        ("gold", dict(reward_model="gold", critic="head", kl_estimator="k3", adaptive_kl=True))):
        out = train_main(tiny_args(algo="ppo", data=data / "prompts.jsonl", out_dir=tmp_path / name,
                                   rollout_batch_size=4, epochs=1, max_new_tokens=6, **extra))
        log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert len(log) == 2 and names <= set(log[-1]) and all(math.isfinite(v) for v in log[-1].values())
        policy, _ = load_model(f"ckpt:{out}")                  # the policy's weights, found by policy_prefix
        assert isinstance(policy, GPT)
    assert "objective/monitor_scores" in json.loads((tmp_path / "proxy" / "metrics.jsonl").read_text().splitlines()[-1])


def test_sum_readout_survives_the_checkpoint(data, tmp_path):
    """--rm_readout=sum is read back from the checkpoint's config: the loaded model's scores on the reference samples
    have the mean 0, std 1 of its stored statistics (an EOS readout with those statistics would not)."""
    rm_dir = train_main(tiny_args(algo="rm", data=data / "prefs.jsonl", out_dir=tmp_path / "rm", rm_readout="sum"))
    rm, tok = load_reward_model(f"ckpt:{rm_dir}")
    assert rm.readout == "sum"
    prompts = [p for p, _, _ in PAIRS * 2] * 2
    scores = RewardModelScorer(rm, tok)(prompts, [c for _, c, _ in PAIRS * 2] + [r for _, _, r in PAIRS * 2])
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std().item() - 1) < 1e-4


# ----------------------------------------------------------------------------------------------------- slow
# Measured (1 thread, CPU). The default world, built from scratch by this test (10 min on one idle core, 7.5 of them
# in the rm stage; 23,891 training pairs, ~1490 held-out pairs): accuracy vs the gold direction 0.909, vs fresh
# annotator labels 0.783 while the annotator agrees with the gold direction 0.817, Pearson r 0.895 (two builds, the
# same numbers). The cached out/toy/rm (same recipe, on a world built by an earlier version of the code): 0.916,
# 0.790 vs 0.813, r 0.918. Earlier recipes, on the 8,972 offline pairs only: 0.761 read at EOS, 0.829-0.857 summed
# over tokens at lr 1e-3..3e-4 and up to 3000 steps (overfitting the label noise), which is why the rm stage now gets
# more comparisons. The gold threshold, 90% agreement with the gold direction, separates the present recipe from those
# earlier ones (83-86% at best), so a regression to an RM that fits the annotators' noise fails; it sits about one
# standard error (0.0075) below the measured 0.909. The label gap and the correlation thresholds are about 4 standard
# errors below the measured values. The RM's measurements: docs/ppo.md.
RM_GOLD_ACCURACY, RM_LABEL_GAP, RM_GOLD_CORRELATION = 0.90, 0.08, 0.85
def heldout_pairs(model, tokenizer, prompts, k, seed, tau):
    """For each prompt, k SFT samples and all their pairs: (prompt, a, b, gold(a), gold(b), annotator says a)."""
    from nanoalign.toy.evaluate import completion_text, model_sampler, sample_completions
    from nanoalign.toy.world import bradley_terry_prob, gold_reward
    ids = [tokenizer.encode(p) for p in prompts for _ in range(k)]
    texts = [completion_text(tokenizer, c) for c in sample_completions(model_sampler(model, tokenizer), ids, seed)]
    rng, pairs = random.Random(seed), []
    for n, prompt in enumerate(prompts):
        group = texts[n * k:(n + 1) * k]
        for i in range(k):
            for j in range(i + 1, k):
                a, b = group[i], group[j]
                ga, gb = gold_reward(prompt + a), gold_reward(prompt + b)
                if a.strip() and b.strip() and ga != gb:
                    pairs.append((prompt, a, b, ga, gb, rng.random() < bradley_terry_prob(ga, gb, tau)))
    return pairs


@pytest.mark.slow
def test_reward_model_on_heldout_toy_pairs(tmp_path, monkeypatch):
    """The default toy world and its proxy reward model, built by the pipeline's rm stage exactly as PPO's default run
    builds it (10 minutes on one idle core, most of it in the rm stage). On all pairs of 4 SFT samples for each
    held-out prompt: accuracy vs the gold direction (> 90%, see the comment above), accuracy vs fresh annotator labels
    compared with the annotator's own agreement with the gold direction (the ceiling for any model), and the
    correlation of the RM's scores with the gold reward."""
    from nanoalign.checkpoint import load_checkpoint
    from nanoalign.loading import model_from_checkpoint
    from nanoalign.data import read_jsonl
    from nanoalign.toy.pipeline import prepare, toy_dir
    from nanoalign.toy.world import TAU
    monkeypatch.setenv("NANOALIGN_TOY_DIR", str(tmp_path / "toy"))
    monkeypatch.setenv("NANOALIGN_TOY_RECIPE", "default")
    cfg = load_config(["--algo=ppo", "--dtype=float32"], algo_config)
    cfg, _ = prepare(cfg, PPO)
    assert cfg.reward_model == f"ckpt:{toy_dir() / 'rm'}" and cfg.monitor_reward == "gold"
    rm, tok = load_reward_model(cfg.reward_model)
    sft, _ = model_from_checkpoint(load_checkpoint(toy_dir() / "sft"))
    prompts = [r["prompt"] for r in read_jsonl(toy_dir() / "corpus" / "eval_prompts.jsonl", "prompt")]
    pairs = heldout_pairs(sft.eval(), tok, prompts, 4, seed=1, tau=TAU)
    scorer = RewardModelScorer(rm, tok)
    ra = scorer([p[0] for p in pairs], [p[1] for p in pairs])
    rb = scorer([p[0] for p in pairs], [p[2] for p in pairs])
    gold_a_wins = torch.tensor([p[3] > p[4] for p in pairs])
    labels_a_wins = torch.tensor([p[5] for p in pairs])
    rm_gold = ((ra > rb) == gold_a_wins).float().mean().item()
    rm_labels = ((ra > rb) == labels_a_wins).float().mean().item()
    annotator_gold = (labels_a_wins == gold_a_wins).float().mean().item()
    scores = torch.cat([ra, rb])
    gold = torch.tensor([p[3] for p in pairs] + [p[4] for p in pairs])
    corr = torch.corrcoef(torch.stack([scores, gold]))[0, 1].item()
    print(f"\nRM on {len(pairs)} held-out pairs: accuracy vs gold direction {rm_gold:.3f}; vs annotator labels "
          f"{rm_labels:.3f} (annotator vs gold {annotator_gold:.3f}); Pearson r(RM score, gold reward) = {corr:.3f}")
    assert rm_gold > RM_GOLD_ACCURACY and rm_labels > annotator_gold - RM_LABEL_GAP and corr > RM_GOLD_CORRELATION
