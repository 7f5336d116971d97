"""The one rollout module of every online algorithm (PPO, RLOO, GRPO, online DPO, RAFT / best-of-n).

    rollout = generate_rollout(policy, tokenizer, prompt_ids, samples_per_prompt=4, max_new_tokens=40,
                               temperature=1.0, scorer=scorer, reference=reference)
    logp = response_logps(model, rollout.batch(), temperature)       # (N, R), same layout as rollout.logprobs
    for minibatch in minibatches(rollout.batch(), size=16, epochs=4, generator=g): ...

A rollout is N = len(prompt_ids) * samples_per_prompt sequences, the samples of one prompt CONSECUTIVE (what
rl_math.rloo_advantages / grpo_advantages expect). Each sequence is laid out as

    input_ids = [ left-padded prompt (P columns) | right-padded response (R columns) ]      (N, P + R)

so response token j is column P + j of every row, and the logits that predict it sit at column P + j - 1.
attention_mask marks the real tokens (prompt without its left padding, response up to and including EOS);
response_mask (N, R) marks the response tokens the algorithm learns from (EOS included, padding after it not).

Three model calls, all under no_grad, none with dropout (each model is put in eval mode for the call):
  1. policy.generate(): KV-cache sampling; its log-probs are of the sampling distribution softmax(logits / T),
     so they are the "old" log-probs of PPO's ratio (recompute_logprobs=True replaces them by one full forward,
     which removes the small numerical gap between incremental and full-sequence attention, e.g. under bf16);
  2. the reference: ONE forward over the whole rollout (chunked into batch_size rows), at the same temperature
     (the KL penalty compares the two sampling distributions, as TRL does);
  3. the scorer on decoded text: scorer(prompts, responses) -> (N,) (nanoalign/scorers.py).
Nothing here is specific to one algorithm: values, advantages and KL penalties are the algorithm's business.
"""
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch

from nanoalign.logps import batch_logps, token_logps


@dataclass
class Rollout:
    input_ids: torch.Tensor       # (N, P + R) long: left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (N, P + R) long: 1 on real prompt and response tokens
    response_mask: torch.Tensor   # (N, R) float: 1 on response tokens up to and including the first EOS
    logprobs: torch.Tensor        # (N, R) float: log pi_old(y_t) at the sampling temperature, 0 on padding
    ref_logprobs: torch.Tensor | None  # (N, R) float: log pi_ref(y_t) at the same temperature, or None
    scores: torch.Tensor          # (N,) float: the scorer's reward of prompt + response
    eos: torch.Tensor             # (N,) bool: the response ended with EOS (not cut at max_new_tokens)
    prompt_index: torch.Tensor    # (N,) long: which prompt of the call each row answers
    prompts: list                 # N prompt texts (decoded, BOS dropped)
    responses: list               # N response texts (decoded, EOS and padding dropped)

    @property
    def prompt_len(self):
        """P: response token j of every row is column P + j of input_ids."""
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def __len__(self):
        return self.input_ids.shape[0]

    def batch(self, **extra):
        """The per-row tensors as a dict (what minibatches() and the trainer's to_device take), plus `extra`
        per-row tensors (values, advantages, ...)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if torch.is_tensor(getattr(self, f.name))}
        return {**out, **extra}


def _rows(batch):
    return batch if isinstance(batch, Mapping) else batch.batch()


def response_logits_to_logps(logits, batch, temperature=1.0):
    """Per-token log-probs of the response tokens from logits over the RESPONSE positions: logits (B, R, V) at
    columns P-1 .. P+R-2 (each predicts the next token). -> (B, R), 0 where response_mask is 0.
    For models whose forward returns more than logits (an actor-critic); plain LMs use response_logps."""
    rows = _rows(batch)
    R = rows["response_mask"].shape[1]
    targets = rows["input_ids"][:, -R:]                                      # (B, R) response tokens
    return token_logps(logits / temperature, targets) * rows["response_mask"]  # (B, R)


def response_logps(model, batch, temperature=1.0, fused=True):
    """log pi(y_t | x, y_<t) of every response token under `model` (a GPT, or a DDP / compiled wrapper of one), at
    the sampling temperature. batch: a Rollout or a dict with input_ids, attention_mask, response_mask.
    -> (B, R) in the layout of Rollout.logprobs, 0 on padding. Uses the one log-prob helper (batch_logps)."""
    rows = _rows(batch)
    input_ids, response_mask = rows["input_ids"], rows["response_mask"]
    R = response_mask.shape[1]
    P = input_ids.shape[1] - R
    loss_mask = torch.cat([torch.zeros_like(input_ids[:, :P], dtype=response_mask.dtype), response_mask], 1)  # (B, P+R)
    _, _, per_token = batch_logps(model, input_ids, loss_mask, rows["attention_mask"], temperature, fused)  # (B, P+R-1)
    return per_token[:, P - 1:]                                              # (B, R): column t+1 predicted at t


def _eval_mode(model):
    """Put a module in eval mode (no dropout) and return a function restoring its previous mode."""
    was_training = model.training
    model.eval()
    return lambda: model.train(was_training)


@torch.no_grad()
def _chunked(fn, batch, batch_size):
    """Apply fn to row-chunks of a dict of (N, ...) tensors and concatenate the (n, ...) results."""
    N = batch["input_ids"].shape[0]
    return torch.cat([fn({k: v[i:i + batch_size] for k, v in batch.items()}) for i in range(0, N, batch_size)])


def _pad_to(x, width, value, left):
    """Pad the last dim of a 2-D tensor to `width` on the left or the right."""
    pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x] if left else [x, pad], dim=1)


@torch.no_grad()
def generate_rollout(policy, tokenizer, prompt_ids, samples_per_prompt, max_new_tokens, scorer, temperature=1.0,
                     top_k=0, top_p=1.0, reference=None, batch_size=64, generator=None, autocast=None,
                     recompute_logprobs=False, fused=True):
    """Sample `samples_per_prompt` responses to each prompt (lists of token ids), score and reference them.

    policy: the UNWRAPPED GPT (generation needs no DDP). reference: a reference.Reference (one no-grad forward of
    the rollout, chunked) or None.
    scorer(prompts, responses) -> (N,) float. batch_size: rows per generate / forward call. autocast: a zero-
    argument callable giving the autocast context (the trainer's ctx.autocast) or None. fused: batch_logps' switch
    for recompute_logprobs. Returns a Rollout on the
    policy's device; max_new_tokens is cut so that the longest prompt still fits the model's block_size.
    """
    autocast = autocast or contextlib.nullcontext
    device = next(policy.parameters()).device
    expanded = [list(p) for p in prompt_ids for _ in range(samples_per_prompt)]        # N prompts, samples adjacent
    budget = min(max_new_tokens, policy.cfg.block_size - max(len(p) for p in expanded))
    restore = _eval_mode(policy)
    gens = []
    for i in range(0, len(expanded), batch_size):
        with autocast():
            gens.append(policy.generate(expanded[i:i + batch_size], budget, temperature=temperature, top_k=top_k,
                                        top_p=top_p, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                                        generator=generator))
    restore()
    P, R = max(g.prompt_ids.shape[1] for g in gens), max(g.tokens.shape[1] for g in gens)
    prompt = torch.cat([_pad_to(g.prompt_ids, P, tokenizer.pad_id, left=True) for g in gens])   # (N, P)
    prompt_mask = torch.cat([_pad_to(g.prompt_mask, P, 0, left=True) for g in gens])            # (N, P)
    tokens = torch.cat([_pad_to(g.tokens, R, tokenizer.pad_id, left=False) for g in gens])      # (N, R)
    response_mask = torch.cat([_pad_to(g.mask, R, 0.0, left=False) for g in gens])              # (N, R)
    logprobs = torch.cat([_pad_to(g.logprobs, R, 0.0, left=False) for g in gens]) * response_mask
    tokens = torch.where(response_mask.bool(), tokens, tokenizer.pad_id)                        # pad after EOS
    eos = ((tokens == tokenizer.eos_id) & response_mask.bool()).any(1)                          # (N,)
    batch = {"input_ids": torch.cat([prompt, tokens], 1),                                       # (N, P + R)
             "attention_mask": torch.cat([prompt_mask, response_mask.long()], 1),
             "response_mask": response_mask}

    def forward_logps(model):
        restore = _eval_mode(model)
        with autocast():
            out = _chunked(lambda b: response_logps(model, b, temperature, fused).float(), batch, batch_size)
        restore()
        return out * response_mask

    if recompute_logprobs:
        logprobs = forward_logps(policy)
    ref_logprobs = None
    if reference is not None:
        with autocast():
            ref_logprobs = _chunked(lambda b: reference.response_logps(b, temperature).float(), batch,
                                    batch_size) * response_mask
    drop = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id}
    prompts = [tokenizer.decode([t for t in row if t not in drop]) for row in prompt.tolist()]
    responses = [tokenizer.decode([t for t in row if t not in drop]) for row in tokens.tolist()]
    scores = scorer(prompts, responses).float().to(device)
    index = torch.arange(len(prompt_ids), device=device).repeat_interleave(samples_per_prompt)
    return Rollout(batch["input_ids"], batch["attention_mask"], response_mask, logprobs, ref_logprobs, scores, eos,
                   index, prompts, responses)


def minibatches(batch, size, epochs=1, generator=None, drop_last=True):
    """Yield dicts of `size` rows of `batch` (a dict of (N, ...) tensors), `epochs` passes over it, each pass in a
    fresh random order (reshuffled every epoch; pass a seeded torch.Generator for reproducibility). With
    drop_last the N % size rows left over in a pass are skipped (each pass skips different ones)."""
    rows = _rows(batch)
    N = next(iter(rows.values())).shape[0]
    if size > N:
        raise ValueError(f"minibatch of {size} rows from a rollout of {N}")
    for _ in range(epochs):
        order = torch.randperm(N, generator=generator)
        stop = N - N % size if drop_last else N
        for i in range(0, stop, size):
            idx = order[i:i + size]
            yield {k: v[idx.to(v.device)] for k, v in rows.items()}
