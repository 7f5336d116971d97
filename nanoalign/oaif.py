"""OAIF on a real chat model, on a CPU: online DPO labelled by an LLM vs offline DPO on as many labels.

    python -m nanoalign.oaif --out=out/oaif                  # SmolLM2-135M-Instruct (nanoalign/hf/gguf.py builds it)
    python -m nanoalign.oaif --model=hf:<dir> --steps=40 ...  # any chat model nanoalign loads

Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback" (arXiv:2402.04792), Alg. 1: sample two
answers from the current policy, let an LLM annotator pick one, take a DPO step on that pair; their claim is that
this beats offline DPO on pairs sampled once from the starting model. Here:
  1. online   train.py --algo=online_dpo with the annotator = the starting model itself (a frozen copy), told to
              prefer the more helpful and shorter answer (JUDGE_INSTRUCTION), asked in both orders; a pair counts only
              when the orders agree (judge_agreement), read against the batch's mean slot bias (judge_calibration,
              --calibrate=false for the raw rule); steps x pairs_per_step labels in all;
  2. offline  the same number of pairs sampled once from the starting model on the same prompts, labelled by the same
              annotator with the same agreement rule, then train.py --algo=dpo with the same LoRA, steps and batch;
  3. eval     on held-out prompts, each policy vs the starting model: the annotator's win rate of greedy answers
              (both orders; a disagreement counts half), mean answer length in tokens, KL(policy || start) of one
              sampled answer per prompt (sum over tokens of log pi - log pi_start), and sample answers side by side.
Results go to <out>/results.json; docs/real-model.md has the measured table.
Departures from the paper: the annotator is the 135M policy's own starting model, not a larger LLM (so its labels
are noisy: judge/disagreement measures the position bias), both policies train LoRA adapters, and the annotator's
choice is read from its A/B answer probabilities (nanoalign/judge.py) instead of a generated answer.
"""
import argparse
import json
from pathlib import Path

import torch

from nanoalign.algos import algo_config, get_algorithm
from nanoalign.algos.online import no_scores
from nanoalign.chat import chat_template_for, user_content
from nanoalign.config import load_config
from nanoalign.data import load_examples, read_jsonl
from nanoalign.hf.gguf import ensure_smollm2
from nanoalign.judge import LLMJudge
from nanoalign.loading import load_model
from nanoalign.reference import Reference
from nanoalign.rollout import generate_rollout
from nanoalign.trainer import resolve_dtype, train

JUDGE_INSTRUCTION = ("You are comparing two answers to a user's instruction. Prefer the answer that is more helpful "
                     "and correct; if both are equally helpful, prefer the shorter one.")
JUDGE_TEMPLATE = ("{instruction}\n\nInstruction: {prompt}\n\nAnswer A: {first}\n\nAnswer B: {second}\n\n"
                  "Which answer is better? Reply with the letter A or B only.")


def run(argv):
    """train.py's path for a run with its own data and init_from (no toy world): load_config, then train. A rerun of
    the recipe starts its runs again (--overwrite)."""
    cfg = load_config([*argv, "--overwrite"], algo_config)
    return train(cfg, get_algorithm(cfg.algo))


def shared_args(a, out):
    return [f"--init_from={a.model}", f"--out_dir={out}", f"--max_steps={a.steps}", f"--batch_size={a.pairs_per_step}",
            f"--micro_batch_size={a.pairs_per_step}", f"--lr={a.lr}", f"--warmup_steps={a.warmup_steps}",
            f"--lora_rank={a.lora_rank}", f"--lora_alpha={2 * a.lora_rank}", f"--lora_targets={a.lora_targets}",
            f"--beta={a.beta}", f"--max_len={a.max_len}", f"--seed={a.seed}", f"--dtype={a.dtype}", "--log_interval=1"]


def make_judge(a, device="cpu"):
    model, tokenizer = load_model(a.model, device)
    return LLMJudge(model, tokenizer, JUDGE_INSTRUCTION, JUDGE_TEMPLATE, labels=("A", "B"),
                    chat_template=chat_template_for(tokenizer.spec), calibrate=a.calibrate)


def answers(model, tokenizer, prompt_ids, max_new_tokens, temperature, dtype, seed=0, reference=None):
    """A Rollout of one answer per prompt (consecutive samples when prompts repeat); greedy at temperature 0. Under
    bf16 autocast when `dtype` (resolved once, as the training runs resolve theirs) is "bfloat16"."""
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else None
    return generate_rollout(model, tokenizer, prompt_ids, 1, max_new_tokens, no_scores, temperature=temperature,
                            reference=reference, generator=torch.Generator().manual_seed(seed), batch_size=64,
                            recompute_logprobs=reference is not None, autocast=autocast)


def judged(judge, prompts, first, second):
    """P(first better) with both orders (in fp32, as online_dpo asks it), and whether the orders agree: (N,), (N,)."""
    return judge.prefer(prompts, first, second), judge.last_agree


def offline_pairs(a, judge, n_labels, path):
    """n_labels pairs of answers sampled once from the starting model (the training prompts in a seeded order, cycled
    as the online run's stream cycles them), labelled by the same judge in both orders; the pairs on which both orders
    agree are written to `path` as conversational preference rows. -> (pairs kept, the judge's disagreement rate)."""
    base, tokenizer = load_model(a.model)
    rows = read_jsonl(a.data, "prompt")
    prompts = load_examples(a.data, "prompt", tokenizer, a.max_len, log=lambda _: None)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(a.seed)).tolist()
    pick = [order[i % len(rows)] for i in range(n_labels)]
    ids = [prompts[i]["prompt_ids"] for i in pick for _ in range(2)]  # two samples of each prompt, adjacent
    both = answers(base, tokenizer, ids, a.max_new_tokens, a.temperature, a.dtype, seed=a.seed)
    first, second = both.responses[0::2], both.responses[1::2]
    p, agree = judged(judge, both.prompts[0::2], first, second)
    kept = 0
    with open(path, "w") as f:
        for i, keep in enumerate(agree.tolist()):
            if keep and p[i] != 0.5 and first[i] != second[i]:  # a tie or two equal answers is no label
                chosen, rejected = (first[i], second[i]) if p[i] > 0.5 else (second[i], first[i])
                f.write(json.dumps({"prompt": rows[pick[i]]["prompt"],
                                    "chosen": [{"role": "assistant", "content": chosen}],
                                    "rejected": [{"role": "assistant", "content": rejected}]}) + "\n")
                kept += 1
    return kept, judge.last_disagreement


def evaluate(a, judge, specs):
    """{name: metrics} for each policy spec vs the starting model on the held-out prompts, and sample answers."""
    base, tokenizer = load_model(a.model)
    prompts = [e["prompt_ids"] for e in load_examples(a.heldout, "prompt", tokenizer, a.max_len, log=lambda _: None)]
    start = answers(base, tokenizer, prompts, a.eval_tokens, 0, a.dtype)
    results, samples = {}, {"prompt": start.prompts, "start": start.responses}
    for name, spec in specs.items():
        policy = load_model(spec)[0].eval()
        greedy = answers(policy, tokenizer, prompts, a.eval_tokens, 0, a.dtype)
        p, agree = judged(judge, start.prompts, greedy.responses, start.responses)
        win = torch.where(agree, (p > 0.5).float(), torch.full_like(p, 0.5))  # orders disagree: half a win
        sampled = answers(policy, tokenizer, prompts, a.eval_tokens, 1.0, a.dtype, seed=a.seed,
                          reference=Reference(base, copy=False))
        kl = ((sampled.logprobs - sampled.ref_logprobs) * sampled.response_mask).sum(1)  # (N,) k1 per answer
        results[name] = {"win_rate_vs_start": float(win.mean()), "judge_disagreement": judge.last_disagreement,
                         "judge_calibrated_disagreement": judge.last_calibrated_disagreement,
                         "mean_length": float(greedy.response_mask.sum(1).mean()),
                         "start_mean_length": float(start.response_mask.sum(1).mean()), "kl": float(kl.mean())}
        samples[name] = greedy.responses
    samples["prompt"] = [user_content(p, judge.chat_template, tokenizer.template_tokens) for p in samples["prompt"]]
    return results, samples


def metrics_of(run_dir):
    return [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanoalign.oaif", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="hf:<dir> of a chat model (default: SmolLM2-135M-Instruct, cached)")
    p.add_argument("--data", default="data/instructions.jsonl")
    p.add_argument("--heldout", default="data/instructions_heldout.jsonl")
    p.add_argument("--out", default="out/oaif")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pairs_per_step", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup_steps", type=int, default=3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lora_targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max_len", type=int, default=256)
    p.add_argument("--eval_tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="as train.py's: auto is bf16 only where measured faster (never on a CPU without native bf16)")
    p.add_argument("--calibrate", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="judge agreement against the batch's mean slot bias (nanoalign/judge.py); false: raw")
    p.add_argument("--skip", default="", help="comma-separated stages already done: online,offline")
    a = p.parse_args(argv)
    if not a.model:
        a.model = f"hf:{ensure_smollm2()}"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, a.skip.split(",")))
    if "online" not in skip:
        run(["--algo=online_dpo", *shared_args(a, out / "online"), f"--data={a.data}", f"--judge={a.model}",
             f"--judge_instruction={JUDGE_INSTRUCTION}", f"--judge_template={JUDGE_TEMPLATE}", "--judge_agreement",
             f"--judge_calibration={a.calibrate}",
             "--reward_model=", f"--max_new_tokens={a.max_new_tokens}", f"--temperature={a.temperature}"])
    online = metrics_of(out / "online")
    judge = make_judge(a)
    a.dtype = resolve_dtype(a.dtype, torch.device("cpu"), judge.model.cfg)  # once, for the sampling and offline run
    n_labels = a.steps * a.pairs_per_step
    if "offline" not in skip:
        kept, disagreement = offline_pairs(a, judge, n_labels, out / "offline_pairs.jsonl")
        (out / "offline_labels.json").write_text(json.dumps({"labels": n_labels, "kept": kept,
                                                             "disagreement": disagreement}))
        if kept:
            batch = min(a.pairs_per_step, kept)  # DPO needs one global batch of pairs; record what it used
            run(["--algo=dpo", *shared_args(a, out / "offline"), f"--data={out / 'offline_pairs.jsonl'}",
                 f"--batch_size={batch}", f"--micro_batch_size={batch}"])
        else:  # nothing to train on; reported as such, the online run is still evaluated
            print(f"no offline pair of {n_labels} got the same label in both orders: offline DPO is not trained")
    labels = json.loads((out / "offline_labels.json").read_text())
    specs = {"online": f"ckpt:{out / 'online'}", **({"offline": f"ckpt:{out / 'offline'}"} if labels["kept"] else {})}
    results, samples = evaluate(a, judge, specs)
    results["online"].update(labels=n_labels, kept=round(sum(a.pairs_per_step * (1 - r["frac_ties"]) for r in online)),
                             train_disagreement=sum(r["judge/disagreement"] for r in online) / len(online),
                             no_signal_steps=online[-1]["no_signal_steps"])
    results.setdefault("offline", {"trained": False}).update(labels=labels["labels"], kept=labels["kept"],
                                                             train_disagreement=labels["disagreement"])
    report = {"args": vars(a), "results": results, "samples": samples}
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(results, indent=2))
    return report


if __name__ == "__main__":
    main()
