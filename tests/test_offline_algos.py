"""The offline preference adapters: cached == live reference log-probs, DPO's first loss log 2, KTO unpairing and
mismatched pairs, Chain-of-Hindsight masks and prompt format, DDP == one process, and a 2-step run of every variant."""
import contextlib
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoalign.algos import ALGORITHMS
from nanoalign.algos.coh import CoH, hindsight_segments, tokenize_segments
from nanoalign.algos.dpo import DPO
from nanoalign.algos.kto import KTO
from nanoalign.config import load_config
from nanoalign.data import Filtered
from nanoalign.tokenizer import get_tokenizer
from nanoalign.toy.evaluate import evaluate
from nanoalign.loading import build_policy
from nanoalign.trainer import Context
from nanoalign.algos import algo_config
from train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()
CPU = torch.device("cpu")
DPO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected"}
EXPECTED_METRICS = {"kto": {"rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"},
                    "orpo": DPO_METRICS | {"nll_loss", "log_odds_ratio", "log_odds_chosen"},
                    "coh": {"nll_loss"}, "cpo": DPO_METRICS | {"nll_loss"}, "rpo": DPO_METRICS | {"nll_loss"}}


def phrase(rng):
    return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory):
    """63 pairs: an odd count, so two ranks get shards of different sizes."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    rows = [{"prompt": phrase(rng).strip(), "chosen": phrase(rng), "rejected": phrase(rng)} for _ in range(63)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_args(data, out_dir, **kw):
    args = dict(algo="dpo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2,
                n_embd=32, block_size=96, max_len=80, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=1,
                max_steps=2, log_interval=1, dtype="float32", dropout=0.0, seed=3)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def build(algorithm_cls, *args):
    """An algorithm on a fresh scratch policy, as train() builds it (same seed -> same initial weights)."""
    cfg = load_config(list(args), algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, 1, contextlib.nullcontext)
    return algorithm_cls(cfg, policy, tokenizer, ctx), policy


def test_precomputed_reference_equals_live_reference_and_first_loss_is_log_2(pref_file, tmp_path):
    cached, policy = build(DPO, *tiny_args(pref_file, tmp_path))
    live, _ = build(DPO, *tiny_args(pref_file, tmp_path, ref_logps="live"))
    assert cached.reference is None and live.reference.frozen is not None  # the cache keeps no model
    stored = torch.tensor([[e["ref_chosen_logps"], e["ref_rejected_logps"]] for e in cached.examples])
    batches = [live.collate(live.examples[i:i + 4]) for i in range(0, len(live.examples), 4)]
    computed = torch.cat([torch.stack(list(live.reference_logps(b).values()), 1) for b in batches])
    assert stored.shape == (63, 2) and torch.allclose(stored, computed, rtol=1e-6, atol=1e-5)

    batch = cached.collate(cached.examples[:4])  # policy == reference: h = 0, loss = -log sigmoid(0) = log 2
    loss, metrics = cached.loss(policy, batch)
    assert abs(loss.item() - math.log(2)) < 1e-6 and metrics["rewards/margins"] == 0
    assert abs(live.loss(live.policy, live.collate(live.examples[:4]))[0].item() - math.log(2)) < 1e-6

    before = live.reference_logps(batches[0])["ref_chosen_logps"]
    with torch.no_grad():  # the live reference is a frozen copy: changing the policy leaves it alone
        for p in live.policy.parameters():
            p.add_(0.1)
    assert torch.equal(live.reference_logps(batches[0])["ref_chosen_logps"], before)


def test_reference_free_types_build_no_reference(pref_file, tmp_path):
    simpo, _ = build(DPO, *tiny_args(pref_file, tmp_path, loss_type="simpo", beta=2.0))
    assert simpo.reference is None and "ref_chosen_logps" not in simpo.examples[0]


def test_bad_loss_settings_fail_before_any_work(pref_file, tmp_path):
    with pytest.raises(ValueError, match="label_smoothing"):
        build(DPO, *tiny_args(pref_file, tmp_path, loss_type="ipo", label_smoothing=0.1))


def test_kto_unpairs_preference_rows_and_pairs_each_prompt_with_another_completion(pref_file, tmp_path):
    kto, policy = build(KTO, *tiny_args(pref_file, tmp_path, algo="kto"))
    rows = [json.loads(line) for line in open(pref_file)]
    tok = kto.tokenizer
    assert len(kto.examples) == 2 * len(rows) and [e["label"] for e in kto.examples[:4]] == [True, False, True, False]

    def split(ids, mask):
        start = mask.index(1)
        return ids[:start], ids[start:]
    for e, text in zip(kto.examples[:2], (rows[0]["chosen"], rows[0]["rejected"])):  # chosen -> True, rejected -> False
        prompt, completion = split(e["input_ids"], e["loss_mask"])
        assert tok.decode(prompt) == rows[0]["prompt"] and completion == tok.encode(text) + [tok.eos_id]
    own = [split(e["input_ids"], e["loss_mask"]) for e in kto.examples]
    theirs = [split(e["kl_ids"], e["kl_mask"]) for e in kto.examples]
    assert [p for p, _ in theirs] == [p for p, _ in own]  # each pair keeps its own prompt ...
    assert sorted(c for _, c in theirs) == sorted(c for _, c in own)  # ... and uses every completion once
    assert sum(a == b for (_, a), (_, b) in zip(own, theirs)) <= 2  # ... of another example (equal text: chance)

    loss, metrics = kto.loss(policy, kto.collate(kto.examples[:8]))  # policy == reference: r = 0, z0 = 0
    assert abs(loss.item() - 0.5) < 1e-6 and metrics["kl"] == 0  # 1 - sigmoid(0) for every example


def test_kto_one_label_dataset_is_a_clear_error(tmp_path):
    path = tmp_path / "thumbs_up.jsonl"
    path.write_text("".join(json.dumps({"prompt": "the film", "completion": f" was {w} .", "label": True}) + "\n"
                            for w in ("good", "great", "fine")))
    with pytest.raises(ValueError, match="both desirable .* has 3 desirable and 0 undesirable"):
        build(KTO, *tiny_args(path, tmp_path, algo="kto"))


def test_coh_sequences_put_the_loss_on_the_answers_only():
    """Hand-written: "the film A helpful answer: was good .<eos> An unhelpful answer: was bad .<eos>", loss on
    " was good .<eos>" and " was bad .<eos>"; the other order swaps the (phrase, answer) blocks."""
    tok = get_tokenizer("bytes")  # one token per character, EOS = 256
    E, enc = tok.eos_id, tok.encode
    args = ("the film", " was good .", " was bad .", "A helpful answer:", "An unhelpful answer:")
    assert hindsight_segments(*args) == [("the film", False), (" A helpful answer:", False), (" was good .", True),
                                         (" An unhelpful answer:", False), (" was bad .", True)]
    example = tokenize_segments(hindsight_segments(*args), tok, 200, Filtered())
    ids, mask = example["input_ids"], example["loss_mask"]
    assert ids == enc("the film A helpful answer: was good .") + [E] + enc(" An unhelpful answer: was bad .") + [E]
    assert [t for t, m in zip(ids, mask) if m] == enc(" was good .") + [E] + enc(" was bad .") + [E]
    swapped = tokenize_segments(hindsight_segments(*args, positive_first=False), tok, 200, Filtered())
    assert swapped["input_ids"] == enc("the film An unhelpful answer: was bad .") + [E] + \
        enc(" A helpful answer: was good .") + [E]
    assert [t for t, m in zip(*swapped.values()) if m] == enc(" was bad .") + [E] + enc(" was good .") + [E]
    spaced = hindsight_segments("Q: 2+2?", "4", "5", "A helpful answer:", "An unhelpful answer:")
    assert "".join(text for text, _ in spaced) == "Q: 2+2? A helpful answer: 4 An unhelpful answer: 5"

    filtered = Filtered()  # 18 + 12 + 21 + 11 = 62 phrase/answer tokens: max_len 64 leaves 2 prompt tokens, 61 none
    cut = tokenize_segments(hindsight_segments(*args), tok, 64, filtered)
    assert cut["input_ids"][:3] == enc("lm ") and filtered.truncated == 1  # the END of "the film" is kept
    assert tokenize_segments(hindsight_segments(*args), tok, 61, filtered) is None and filtered.dropped["too_long"] == 1


def test_coh_phrase_first_repeats_the_prompt_after_each_phrase():
    """coh_phrase_first: "Good: the film was good .<eos> Bad: the film was bad .<eos>", loss on the answers only;
    nothing is cut (the prompt appears twice): a sequence over max_len is dropped."""
    tok = get_tokenizer("bytes")
    E, enc = tok.eos_id, tok.encode
    segments = hindsight_segments("the film", " was good .", " was bad .", "Good:", "Bad:", phrase_first=True)
    assert segments == [("Good:", False), (" the film", False), (" was good .", True), (" Bad:", False),
                        (" the film", False), (" was bad .", True)]
    filtered = Filtered()
    example = tokenize_segments(segments, tok, 200, filtered, cut_prompt=False)
    assert example["input_ids"] == enc("Good: the film was good .") + [E] + enc(" Bad: the film was bad .") + [E]
    assert [t for t, m in zip(*example.values()) if m] == enc(" was good .") + [E] + enc(" was bad .") + [E]
    assert tokenize_segments(segments, tok, 50, filtered, cut_prompt=False) is None  # 51 tokens
    assert filtered.dropped["too_long"] == 1 and filtered.truncated == 0
    assert CoH.format_prompt({"coh_positive": "Good:", "coh_phrase_first": True}, "the film") == "Good: the film"


def test_coh_format_prompt_and_random_order(pref_file, tmp_path):
    coh, _ = build(CoH, *tiny_args(pref_file, tmp_path, algo="coh", max_len=96))
    assert CoH.format_prompt(coh.cfg, "the film") == "the film A helpful answer:"
    assert CoH.format_prompt({"coh_positive": "Good:"}, "Q:\n") == "Q:\nGood:"  # a saved config dict works too
    assert CoH.format_prompt(coh.cfg, "") == "A helpful answer:"
    assert len(coh.examples) > 50
    starts = {coh.tokenizer.decode(e["input_ids"]).split(" answer:")[0].split()[-1] for e in coh.examples}
    assert starts == {"helpful", "unhelpful"}  # both orders occur


def test_coh_toy_preset_resolves_to_its_recipe():
    """data/coh_toy.toml (docs/coh.md's recipe and the frontier's coh_toy point) loads as CoH's config with the
    phrases first, " good" / " bad" with their leading spaces, and its learning rate, length and batch."""
    cfg = load_config([str(Path(__file__).resolve().parents[1] / "data" / "coh_toy.toml")], algo_config)
    assert (cfg.algo, cfg.coh_phrase_first, cfg.coh_positive, cfg.coh_negative) == ("coh", True, " good", " bad")
    assert (cfg.lr, cfg.max_steps, cfg.batch_size) == (3e-3, 6000, 32)
    assert CoH.format_prompt(cfg, "the acting was") == " good the acting was"


def test_coh_is_evaluated_after_its_feedback_phrase(pref_file, tmp_path):
    """The toy world's evaluation (pipeline.evaluate_run passes CoH.format_prompt's text as policy_prompts) samples
    the policy after prompt + positive phrase, scores the completion after the plain prompt, and its KL compares
    log pi(y | prompt + phrase) with log pi_ref(y | prompt). Policy = reference isolates the conditioning."""
    coh, policy = build(CoH, *tiny_args(pref_file, tmp_path, algo="coh", max_len=96))
    prompts = ["the film", "a plot was", "the acting"]
    plain = evaluate(policy, policy, coh.tokenizer, prompts, max_new_tokens=8, policy_prompts=prompts)
    assert abs(plain["kl"]) < 1e-6 and plain["win_rate"] == 0.5  # the same prompts: the same samples
    phrased = [CoH.format_prompt(coh.cfg, p) for p in prompts]
    result = evaluate(policy, policy, coh.tokenizer, prompts, max_new_tokens=8, policy_prompts=phrased)
    assert abs(result["kl"]) > 1e-3  # the policy was conditioned on the phrase, the reference was not
    assert [e["prompt"] for e in result["examples"]] == prompts  # scored after the plain prompt


OFFLINE = sorted(a for a, (target, _) in ALGORITHMS.items() if target.split(":")[0] in ("dpo", "kto", "orpo", "coh"))


@pytest.mark.parametrize("algo", OFFLINE)
def test_every_variant_runs_two_steps_and_logs_trl_metrics(algo, pref_file, tmp_path):
    out = train_main(tiny_args(pref_file, tmp_path / algo, algo=algo, max_len=96, eval_data=pref_file, eval_interval=2,
                               eval_batches=2))
    records = [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
    expected = EXPECTED_METRICS.get(algo, DPO_METRICS)
    assert expected <= records[-1].keys() and {f"eval/{k}" for k in expected} <= records[-1].keys()


@pytest.mark.integration
def test_cli_dpo_on_two_ranks_equals_one_process(pref_file, tmp_path):
    """torchrun with 2 ranks (each precomputes half of the 63 reference pairs, then all_gather) gives the losses of
    one process with accumulation 2: the gathered reference log-probs landed on the right examples."""
    one = train_main(tiny_args(pref_file, tmp_path / "one", max_steps=3))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *tiny_args(pref_file, tmp_path / "two", max_steps=3)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("loss", "rewards/margins"):
        a, b = ([json.loads(line)[name] for line in open(Path(d) / "metrics.jsonl")] for d in (one, tmp_path / "two"))
        assert len(a) == 3 and all(abs(x - y) <= 1e-5 + 1e-4 * abs(x) for x, y in zip(a, b))  # float summation order
