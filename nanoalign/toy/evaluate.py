"""Evaluation in the toy world, shared by every algorithm: gold reward, KL to the reference, win rate,
grammaticality and length of samples for held-out prompts (the measurements of DPO's Figure 2, section 6.1).

    result = evaluate(policy, reference, tokenizer, prompts, n_samples=1, seed=0)
    result["gold_reward"], result["kl"], result["win_rate"], result["ref_gold_reward"], ...

A *sampler* turns prompts into completions; by default it is the policy's own `generate` (KV cache, ragged
prompts in one batch). A method whose policy is not one network (best-of-n: sample n from the reference, keep
the best by some reward) passes its own sampler and policy=None; its KL is then unknown here and left None
(best-of-n's is known in closed form: log n - (n - 1) / n).

KL(pi || pi_ref) is estimated as the DPO paper does, from the policy's own samples y ~ pi(.|x):
    KL ~ mean over samples of sum_t [log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t)]   (nats per sequence)
with both log-probs from one `batch_logps` forward each (the final EOS included). The estimate is unbiased but
noisy; a single sample can be negative. Evaluation runs in float32 (no autocast): the models are tiny.

The alignment tax (InstructGPT's term; PPO-ptx, algos/ppo.py D11) is measured as `corpus_nll`, the per-token NLL of
fresh reviews of the corpus grammar (make_corpus with a seed no stage uses, so no model saw these texts), i.e. the
base model's own pretraining objective on held-out text:
    python -m nanoalign.toy.evaluate out/toy/base out/toy/sft out/ppo [--n_texts=2000 --seed=7]
"""
import argparse
import json
import math
from typing import Callable

import torch

from nanoalign.checkpoint import load_checkpoint
from nanoalign.data import collate, tokenize_sft
from nanoalign.loading import model_from_checkpoint
from nanoalign.logps import batch_logps
from nanoalign.toy.world import gold_reward, is_grammatical, make_corpus

# prompt token lists, a torch.Generator -> completion token lists (EOS included where the sample ended)
Sampler = Callable[[list[list[int]], torch.Generator], list[list[int]]]


def model_sampler(model, tokenizer, max_new_tokens: int = 40, temperature: float = 1.0) -> Sampler:
    """Ancestral sampling from `model` (top_k/top_p off, as the KL estimate assumes the full distribution)."""
    def sample(prompt_ids, generator):
        budget = min(max_new_tokens, model.cfg.block_size - max(len(p) for p in prompt_ids))
        out = model.generate(prompt_ids, budget, temperature=temperature, eos_id=tokenizer.eos_id,
                             pad_id=tokenizer.pad_id, generator=generator)
        return [row[mask.bool()].tolist() for row, mask in zip(out.tokens, out.mask)]  # up to the first EOS
    return sample


def sample_completions(sampler: Sampler, prompt_ids: list[list[int]], seed: int, batch_size: int = 256,
                       device="cpu") -> list[list[int]]:
    """Run `sampler` over `prompt_ids` in batches with one seeded generator (same seed -> same samples)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    completions = []
    for i in range(0, len(prompt_ids), batch_size):
        completions += sampler(prompt_ids[i:i + batch_size], generator)
    return completions


def completion_text(tokenizer, completion_ids: list[int]) -> str:
    return tokenizer.decode([t for t in completion_ids if t != tokenizer.eos_id])


@torch.no_grad()
def completion_logps(model, prompt_ids, completion_ids, pad_id, batch_size=256, temperature=1.0) -> torch.Tensor:
    """sum_t log p(y_t | x, y_<t) over each completion (its EOS included), (N,) float32 on the CPU."""
    device = next(model.parameters()).device
    examples = [{"input_ids": p + c, "loss_mask": [0] * len(p) + [1] * len(c)} for p, c in zip(prompt_ids, completion_ids)]
    out = []
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id)  # right-padded (B, T)
        logps, _, _ = batch_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device),
                                  batch["attention_mask"].to(device), temperature=temperature)
        out.append(logps.float().cpu())
    return torch.cat(out)


def mean_and_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / max(n - 1, 1)
    return mean, math.sqrt(var / n)


def score(prompts: list[str], completions: list[str]) -> dict[str, list]:
    """Gold reward and grammaticality of each full review prompt + completion (scored whole, as the paper does)."""
    texts = [p + c for p, c in zip(prompts, completions)]
    return {"reward": [gold_reward(t) for t in texts], "grammatical": [float(is_grammatical(t)) for t in texts]}


@torch.no_grad()
def evaluate(policy, reference, tokenizer, prompts: list[str], n_samples: int = 1, seed: int = 0, *,
             max_new_tokens: int = 40, temperature: float = 1.0, batch_size: int = 256,
             sampler: Sampler | None = None, n_examples: int = 4, policy_prompts: list[str] | None = None) -> dict:
    """Sample n_samples completions per prompt from the policy (or `sampler`) and from the reference with the
    same seed; return mean gold reward, KL(pi || pi_ref), win rate against the reference by gold reward (ties
    count 1/2), grammaticality rate and mean length (completion tokens incl. EOS) for both, plus standard errors
    and a few example pairs. Models are put in eval mode.
    policy_prompts: what the policy samples from instead of `prompts` (Chain of Hindsight's prompt + feedback
    phrase); the completion is still scored after the plain prompt, and the KL compares the distributions the two
    models give the same user prompt: log pi(y | policy prompt) - log pi_ref(y | prompt)."""
    if sampler is None and policy is None:
        raise ValueError("give a policy model or a sampler")
    reference.eval()
    if policy is not None:
        policy.eval()
    device = next(reference.parameters()).device
    prompt_ids = [tokenizer.encode(p) for p in prompts for _ in range(n_samples)]
    policy_ids = prompt_ids if policy_prompts is None else [tokenizer.encode(p) for p in policy_prompts
                                                             for _ in range(n_samples)]
    prompt_texts = [p for p in prompts for _ in range(n_samples)]
    sampler = sampler or model_sampler(policy, tokenizer, max_new_tokens, temperature)
    ref_sampler = model_sampler(reference, tokenizer, max_new_tokens)
    ours = sample_completions(sampler, policy_ids, seed, batch_size, device)
    theirs = sample_completions(ref_sampler, prompt_ids, seed, batch_size, device)
    our_text = [completion_text(tokenizer, c) for c in ours]
    their_text = [completion_text(tokenizer, c) for c in theirs]
    our_scores, their_scores = score(prompt_texts, our_text), score(prompt_texts, their_text)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(our_scores["reward"], their_scores["reward"])]

    result = {"n": len(prompt_ids)}
    result["gold_reward"], result["gold_reward_se"] = mean_and_se(our_scores["reward"])
    result["ref_gold_reward"], result["ref_gold_reward_se"] = mean_and_se(their_scores["reward"])
    result["win_rate"], result["win_rate_se"] = mean_and_se(wins)
    result["kl"], result["kl_se"] = None, None
    if policy is not None:
        log_pi = completion_logps(policy, policy_ids, ours, tokenizer.pad_id, batch_size, temperature)  # (N,)
        log_ref = completion_logps(reference, prompt_ids, ours, tokenizer.pad_id, batch_size)  # (N,)
        result["kl"], result["kl_se"] = mean_and_se((log_pi - log_ref).tolist())  # sum_t log pi/pi_ref, averaged
    result["grammatical"] = sum(our_scores["grammatical"]) / len(ours)
    result["ref_grammatical"] = sum(their_scores["grammatical"]) / len(theirs)
    result["length"] = sum(map(len, ours)) / len(ours)
    result["ref_length"] = sum(map(len, theirs)) / len(theirs)
    result["examples"] = [{"prompt": p, "policy": a, "reference": b}
                          for p, a, b in list(zip(prompt_texts, our_text, their_text))[:n_examples]]
    return result


def format_table(result: dict, title: str = "") -> str:
    """A short policy-vs-reference table of an `evaluate` result."""
    def cell(value, digits=3):
        return f"{value:>10.{digits}f}" if value is not None else f"{'n/a':>10}"
    rows = [("gold reward", result["gold_reward"], result["ref_gold_reward"]),
            ("win rate vs ref", result["win_rate"], 0.5),
            ("KL(pi || ref)", result["kl"], 0.0),
            ("grammatical", result["grammatical"], result["ref_grammatical"]),
            ("length (tokens)", result["length"], result["ref_length"])]
    lines = [title] if title else []
    lines.append(f"{'':<18}{'policy':>10}{'reference':>10}")
    lines += [f"{name:<18}{cell(ours)}{cell(theirs)}" for name, ours, theirs in rows]
    return "\n".join(lines)


@torch.no_grad()
def corpus_nll(model, tokenizer, texts: list[str], batch_size: int = 256) -> float:
    """Per-token NLL (nats, EOS included) of `texts` as {"text"} rows ([bos] + text + [eos], every token a target)."""
    model.eval()
    device = next(model.parameters()).device
    examples, _ = tokenize_sft([{"text": t} for t in texts], tokenizer, model.cfg.block_size)
    total, tokens = 0.0, 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], tokenizer.pad_id)
        logps, counts, _ = batch_logps(model, batch["input_ids"].to(device), batch["loss_mask"].to(device),
                                       batch["attention_mask"].to(device))
        total, tokens = total - float(logps.sum()), tokens + float(counts.sum())
    return total / max(tokens, 1.0)


def main(argv=None):
    """Print {"run", "corpus_nll", "texts"} per run folder: the alignment tax is a run's NLL minus its init's."""
    parser = argparse.ArgumentParser(description="per-token NLL of held-out reviews of the toy corpus grammar")
    parser.add_argument("runs", nargs="+", help="run folders (their ckpt.pt): e.g. out/toy/base out/toy/sft out/ppo")
    parser.add_argument("--n_texts", type=int, default=2000, help="held-out reviews to score")
    parser.add_argument("--seed", type=int, default=7, help="make_corpus seed of the held-out reviews (stages use 0)")
    args = parser.parse_args(argv)
    texts = make_corpus(args.n_texts, args.seed)
    for run in args.runs:
        model, tokenizer = model_from_checkpoint(load_checkpoint(run))
        nll = corpus_nll(model, tokenizer, texts)
        print(json.dumps({"run": run, "corpus_nll": round(nll, 4), "texts": len(texts)}))


if __name__ == "__main__":
    main()
