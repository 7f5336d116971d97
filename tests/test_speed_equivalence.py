"""Every speed optimisation against its plain version: the chunked completion log-probs (values, gradients, no
(B, T, V) tensor, through DDP and torch.compile wrappers), length-bucketed micro-batches (same examples per
step, same chunks under any (world, accum) split, exact resume, less padding, same DPO step), fused AdamW on CPU
(same steps as the for-loop AdamW), generate()'s inverse-CDF sampling (same distribution as torch.multinomial; its
two-level cdf draws what one cdf over all columns draws), its one-query attention (the SDPA kernel's output), its prefill (head on the last position only; KV cache in the
autocast dtype) and its linear layers on prepacked weights (F.linear's outputs, the plain generate()'s samples); and
a benchmark smoke run (python bench/bench.py).
"""
import contextlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._python_dispatch import TorchDispatchMode

import nanoalign.logps
from nanoalign.data import micro_batches, padding_fraction
from nanoalign.logps import batch_logps, batch_logps_plain
from nanoalign.model import (GPT, GPTConfig, KVCache, decode_attention, llama_config, packed_linears, sample_categorical,
                             set_packed_decode)
from nanoalign.precision import packed_decode_is_faster

ROOT = Path(__file__).resolve().parents[1]
V = 97
CONFIGS = {
    "gpt2": GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32),
    "llama": llama_config(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIGS[name])


def batch(seed=0, B=4, T=20):
    """Ragged completions: row 0 from 5 on, row 1 a span in the middle, row 2 fully masked, row 3 from 2 on."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T)
    mask[0, 5:], mask[1, 10:15], mask[3, 2:] = 1, 1, 1
    return ids, mask


def values_and_grads(fn, model, ids, mask, temperature=1.0):
    """logps, counts, token_logps and every parameter's gradient of a loss that reads both outputs."""
    model.zero_grad(set_to_none=True)
    logps, counts, per_token = fn(model, ids, mask, temperature=temperature)
    (logps.sum() + (per_token ** 2).sum()).backward()  # the per-token output is used by PPO-style losses
    core = getattr(model, "module", getattr(model, "_orig_mod", model))  # names without a DDP/compile prefix
    grads = {name: p.grad.clone() for name, p in core.named_parameters() if p.requires_grad}
    return logps.detach(), counts, per_token.detach(), grads


def assert_same(a, b, rtol, atol):
    """Outputs elementwise; gradients relative to each tensor's largest entry (summation order differs)."""
    for x, y in zip(a[:3], b[:3]):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        scale = b[3][name].abs().max().item()
        assert (a[3][name] - b[3][name]).abs().max().item() <= rtol * scale + atol, name


# ---------------------------------------------------------------------------------------- chunked log-probs
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_rows", [1, 7, 1000])  # a chunk per row, ragged chunks, one chunk
def test_fused_logps_equal_plain_values_and_gradients(name, temperature, chunk_rows, monkeypatch):
    monkeypatch.setattr(nanoalign.logps, "CHUNK_ELEMENTS", chunk_rows * V)
    model = make(name)
    ids, mask = batch()
    plain = values_and_grads(batch_logps_plain, model, ids, mask, temperature)
    fused = values_and_grads(batch_logps, model, ids, mask, temperature)
    assert_same(fused, plain, rtol=1e-5, atol=1e-5)
    assert fused[1].tolist() == [15.0, 5.0, 0.0, 18.0] and fused[0][2] == 0  # counts; the masked row sums to 0
    assert type(model.lm_head) is torch.nn.Linear  # the head is back after the hidden-states call


def test_fused_logps_close_to_plain_under_bf16_autocast():
    """bf16 rounds the logits differently in the two paths (one big matmul vs chunks), so close, not equal."""
    model = make("llama")
    ids, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = values_and_grads(batch_logps_plain, model, ids, mask)
        fused = values_and_grads(batch_logps, model, ids, mask)
    torch.testing.assert_close(fused[0], plain[0], rtol=2e-2, atol=0.1)
    for name in plain[3]:
        scale = plain[3][name].abs().max().item()
        assert (fused[3][name] - plain[3][name]).abs().max().item() <= 5e-2 * scale + 1e-6, name


def test_fully_masked_batch_gives_zero_logps_and_zero_gradients():
    model = make("gpt2")
    ids, _ = batch()
    mask = torch.zeros(ids.shape)
    logps, counts, per_token = batch_logps(model, ids, mask)
    (logps.sum() + per_token.sum()).backward()
    assert logps.tolist() == [0.0] * 4 and counts.tolist() == [0.0] * 4
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_fractional_mask_weights_and_plain_switch():
    """A loss_mask of weights is applied as the plain version applies it; fused=False is the plain path."""
    model = make("gpt2")
    ids, mask = batch()
    mask[0, 5:] = 0.5
    assert_same(values_and_grads(batch_logps, model, ids, mask), values_and_grads(batch_logps_plain, model, ids, mask),
                rtol=1e-5, atol=1e-5)
    seen = []
    model.lm_head.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    batch_logps(model, ids, mask)
    assert seen == []  # fused: the head's matmul runs inside CompletionLogps, not as a module
    batch_logps(model, ids, mask, fused=False)
    assert seen == [(4, 20, V)]  # plain: the head ran on every position


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("fn", [batch_logps, batch_logps_plain])
def test_no_batch_by_vocab_tensor_in_forward_or_backward(fn, monkeypatch):
    """Vocabulary 4096, width 16, B x (T-1) = 4 x 19 positions: with 8-row chunks the fused path's largest tensor
    is the (V, C) head weight (65536 elements; a chunk is 8 x V = 32768), the plain one holds all 4 x 20 x 4096 = 327680
    logits."""
    monkeypatch.setattr(nanoalign.logps, "CHUNK_ELEMENTS", 8 * 4096)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4096, block_size=32, n_layer=1, n_head=2, n_embd=16))
    ids, mask = batch()
    with LargestTensor() as tracker:
        logps, _, _ = fn(model, ids, mask)
        logps.sum().backward()
    if fn is batch_logps:
        assert tracker.largest == 4096 * 16
    else:
        assert tracker.largest == 4 * 20 * 4096


class CountHeadMatmuls(TorchDispatchMode):
    """Counts matmuls with a vocabulary-sized operand (the head's)."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.count = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            self.count += any(isinstance(a, torch.Tensor) and self.vocab in a.shape for a in args)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("chunk_rows, backward_matmuls", [(1000, 2), (7, 2 * 6 + 5)])  # 38 rows: 1 or 6 chunks
def test_last_chunk_logits_are_reused_not_recomputed(chunk_rows, backward_matmuls, monkeypatch):
    """Backward recomputes the logits of every chunk but the last (kept from forward): one chunk -> the 2 gradient
    matmuls only; 6 chunks -> 2 per chunk + 5 recomputations; and a second backward through a retained graph (the
    saved logits already consumed) recomputes them and gets the same gradients."""
    monkeypatch.setattr(nanoalign.logps, "CHUNK_ELEMENTS", chunk_rows * V)
    model = make("gpt2")
    ids, mask = batch()
    assert int(mask[:, 1:].sum()) == 38  # completion rows through the head
    logps, _, _ = batch_logps(model, ids, mask)
    with CountHeadMatmuls(V) as counter:
        logps.sum().backward(retain_graph=True)
    assert counter.count == backward_matmuls
    first = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    logps.sum().backward()
    torch.testing.assert_close(model.lm_head.weight.grad, first, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", CONFIGS)
def test_frozen_head_skips_its_weight_gradient_and_keeps_every_other(name, monkeypatch):
    """A frozen head (LoRA runs; the tied GPT-2 head is the frozen embedding) needs no dL/dW: backward runs one
    vocabulary matmul per chunk (dL/dh) plus the recomputations, not two, and every other gradient equals the plain
    path's."""
    monkeypatch.setattr(nanoalign.logps, "CHUNK_ELEMENTS", 7 * V)  # 38 completion rows: 6 chunks
    model = make(name)
    model.lm_head.weight.requires_grad_(False)
    ids, mask = batch()
    plain = values_and_grads(batch_logps_plain, model, ids, mask)
    fused = values_and_grads(batch_logps, model, ids, mask)
    assert "lm_head.weight" not in fused[3] and fused[3]  # the head is frozen, the rest trains
    logps, _, _ = batch_logps(model, ids, mask)
    with CountHeadMatmuls(V) as counter:
        logps.sum().backward()
    assert counter.count == 6 + 5  # dL/dh per chunk + 5 recomputed chunks (the last chunk's logits are kept)
    assert model.lm_head.weight.grad is None
    assert_same(fused, plain, rtol=1e-5, atol=1e-5)


def test_fused_logps_through_ddp_wrapper():
    """DDP (gloo, one rank): the forward goes through the wrapper, gradients equal the plain version's."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = make("llama")
        ids, mask = batch()
        plain = values_and_grads(batch_logps_plain, model, ids, mask)
        wrapped = DDP(model)
        fused = values_and_grads(batch_logps, wrapped, ids, mask)
        assert_same(fused, plain, rtol=1e-5, atol=1e-5)
        assert type(model.lm_head) is torch.nn.Linear
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fused_logps_through_torch_compile():
    model = make("gpt2")
    ids, mask = batch()
    plain = values_and_grads(batch_logps_plain, model, ids, mask)
    fused = values_and_grads(batch_logps, torch.compile(model), ids, mask)
    assert_same(fused, plain, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- length bucketing
def sft_examples(n, seed=0):
    rng = random.Random(seed)
    return [{"input_ids": [1] * rng.randint(2, 60), "loss_mask": [], "id": i} for i in range(n)]


def stream_ids(examples, micro, accum, world, seed, steps, bucket, start_step=0):
    """[step][rank][micro-step] -> list of example ids."""
    streams = [micro_batches(examples, micro, accum, rank, world, seed, start_step, lambda ex: [e["id"] for e in ex],
                             bucket) for rank in range(world)]
    return [[[next(s) for _ in range(accum)] for s in streams] for _ in range(steps)]


def test_bucketing_keeps_each_steps_examples_and_the_chunks_of_any_world_accum_split():
    examples = sft_examples(40)
    plain = stream_ids(examples, 2, 4, 1, 5, 6, bucket=False)
    one_process = stream_ids(examples, 2, 4, 1, 5, 6, bucket=True)
    ddp = stream_ids(examples, 2, 2, 2, 5, 6, bucket=True)  # 2 ranks x accum 2, same micro-batch size
    for step in range(6):
        chunks = lambda s: sorted(sorted(c) for rank in s[step] for c in rank)  # noqa: E731
        assert chunks(one_process) == chunks(ddp)  # the same micro-batches, whoever computes them
        assert sorted(sum(sum(plain[step], []), [])) == sorted(sum(sum(one_process[step], []), []))
    lengths = [[max(len(examples[i]["input_ids"]) for i in c) for c in one_process[0][0]]]
    assert lengths[0] == sorted(lengths[0])  # one process: micro-steps go from short to long


def test_bucketing_sorted_chunks_are_dealt_round_robin_to_ranks():
    """8 examples of lengths 8..1 (id i has length 8 - i), micro 1, accum 2, 2 ranks: sorted ids 7,6,5,4 (any
    permutation), sorted chunk j -> rank j % 2, micro-step j // 2."""
    examples = [{"input_ids": [0] * (8 - i), "id": i} for i in range(4)]
    ddp = stream_ids(examples, 1, 2, 2, 0, 1, bucket=True)[0]
    assert ddp == [[[3], [1]], [[2], [0]]]  # rank 0 gets the 1st and 3rd shortest, rank 1 the 2nd and 4th


def test_bucketing_resume_is_exact():
    examples = sft_examples(24)
    straight = stream_ids(examples, 2, 2, 2, 7, 8, bucket=True)
    resumed = stream_ids(examples, 2, 2, 2, 7, 3, bucket=True, start_step=5)
    assert straight[5:] == resumed


def test_padding_fraction_by_hand_and_bucketing_cuts_it():
    """Lengths 1, 2, 3, 4 in micro-batches of 2, one step (accum 2), 10 real tokens. Sorted: [1, 2] padded to
    2 x 2 and [3, 4] to 2 x 4 -> 12 positions, padding 2/12 = 1/6. Unsorted, another pairing may come out:
    [1, 3] + [2, 4] or [1, 4] + [2, 3] -> 6 + 8 = 14 positions, padding 4/14 = 2/7."""
    examples = [{"input_ids": [0] * n} for n in (1, 2, 3, 4)]
    assert padding_fraction(examples, 2, 2, 1, bucket=True) == pytest.approx(1 / 6)
    assert padding_fraction(examples, 2, 2, 1, bucket=False) in (pytest.approx(1 / 6), pytest.approx(2 / 7))
    pairs = [{"chosen_ids": [0] * random.Random(i).randint(5, 50), "rejected_ids": [0] * random.Random(-i).randint(5, 50)}
             for i in range(64)]
    assert padding_fraction(pairs, 4, 4, 2, bucket=True) < padding_fraction(pairs, 4, 4, 2, bucket=False)


def test_bucketing_is_the_default_and_plain_lists_are_not_sorted():
    examples = sft_examples(16)
    default = micro_batches(examples, 2, 4, 0, 1, 1, 0, lambda ex: [e["id"] for e in ex])
    assert [next(default) for _ in range(8)] == [m for step in stream_ids(examples, 2, 4, 1, 1, 2, True) for m in step[0]]
    assert stream_ids(examples, 2, 4, 1, 1, 2, True) != stream_ids(examples, 2, 4, 1, 1, 2, False)
    ints = micro_batches(list(range(8)), 2, 2, 0, 1, 0, 0, list, bucket=True)  # not tokenised: order untouched
    assert next(ints) == next(micro_batches(list(range(8)), 2, 2, 0, 1, 0, 0, list, bucket=False))


# ---------------------------------------------------------------------------------------- one DPO step
def preference_file(path, n=16, seed=0):
    rng = random.Random(seed)
    words = "good bad film plot great dull acting music very not".split()
    say = lambda k: " ".join(rng.choice(words) for _ in range(k))  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": say(rng.randint(1, 6)), "chosen": " " + say(rng.randint(1, 12)),
                                "rejected": " " + say(rng.randint(1, 12))}) + "\n")
    return path


def dpo_args(data, out_dir, **kw):
    args = dict(algo="dpo", data=data, out_dir=out_dir, init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2,
                n_embd=32, block_size=128, max_len=120, batch_size=8, micro_batch_size=2, lr=1e-2, warmup_steps=1,
                max_steps=2, log_interval=1, dtype="float32", dropout=0.0, seed=3)
    return [f"--{k}={v}" for k, v in {**args, **kw}.items()]


def dpo_algorithm(data, tmp_path):
    from nanoalign.algos.dpo import DPO
    from nanoalign.config import load_config
    from nanoalign.loading import build_policy
    from nanoalign.trainer import Context
    from nanoalign.algos import algo_config
    cfg = load_config(dpo_args(data, tmp_path), algo_config)
    policy, tokenizer = build_policy(cfg, torch.device("cpu"))
    ctx = Context(torch.device("cpu"), 0, 1, cfg.micro_batch_size, cfg.batch_size // cfg.micro_batch_size,
                  lambda: torch.autocast("cpu", enabled=False))
    return DPO(cfg, policy, tokenizer, ctx)


def step_gradient(algo, start_step):
    """The accumulated gradient of optimizer step `start_step`, as the trainer computes it."""
    algo.policy.zero_grad(set_to_none=True)
    batches = algo.batches(start_step)
    for _ in range(algo.ctx.grad_accum):
        loss, _ = algo.loss(algo.policy, next(batches))
        (loss / algo.ctx.grad_accum).backward()
    return {name: p.grad.clone() for name, p in algo.policy.named_parameters()}


def test_dpo_step_gradient_is_the_same_with_and_without_bucketing(tmp_path):
    """DPO's loss is a mean over pairs and micro-batches have equal sizes, so an optimizer step's gradient does
    not depend on which pairs share a micro-batch (the policy is moved off pi_ref first so the gradient is not ~0)."""
    algo = dpo_algorithm(preference_file(tmp_path / "prefs.jsonl"), tmp_path)
    with torch.no_grad():
        for p in algo.policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert algo.cfg.bucket_by_length  # the default
    micro = next(algo.batches(1))
    assert micro["input_ids"].shape[1] < max(len(e["chosen_ids"]) for e in algo.examples)  # bucketing is at work
    bucketed = step_gradient(algo, 1)
    algo.cfg.bucket_by_length = False  # --bucket_by_length=false
    plain = step_gradient(algo, 1)
    for name in plain:
        scale = plain[name].abs().max().item()
        assert (bucketed[name] - plain[name]).abs().max().item() <= 1e-5 * scale + 1e-9, name


def test_fused_logps_key_switches_the_dpo_loss_and_reference_to_the_plain_path(tmp_path):
    """--fused_logps=false: the policy's loss and the live reference's forward run the head on every position."""
    from nanoalign.algos.dpo import DPO
    from nanoalign.config import load_config
    from nanoalign.loading import build_policy
    from nanoalign.trainer import Context
    from train import algo_config
    data = preference_file(tmp_path / "prefs.jsonl")
    for fused in (True, False):
        cfg = load_config(dpo_args(data, tmp_path, ref_logps="live", fused_logps=fused), algo_config)
        policy, tokenizer = build_policy(cfg, torch.device("cpu"))
        algo = DPO(cfg, policy, tokenizer, Context(torch.device("cpu"), 0, 1, 2, 4, contextlib.nullcontext))
        seen = []
        for model in (algo.policy, algo.reference.frozen):
            model.lm_head.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
        algo.loss(algo.policy, next(algo.batches(0)))
        assert len(seen) == (0 if fused else 2), fused  # plain: the policy's and pi_ref's (4, T, vocab) logits


@pytest.mark.slow
def test_ddp_two_processes_match_one_with_bucketing(tmp_path):
    """torchrun --nproc_per_node=2 (gloo), micro 2 x accum 2 x 2 ranks == 1 process micro 2 x accum 4 (DPO)."""
    from nanoalign.algos.dpo import DPO
    from nanoalign.config import load_config
    from nanoalign.trainer import train
    from nanoalign.algos import algo_config
    data = preference_file(tmp_path / "prefs.jsonl")
    one = train(load_config(dpo_args(data, tmp_path / "one", max_steps=3), algo_config), DPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *dpo_args(data, tmp_path / "two", max_steps=3)]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = lambda d: [json.loads(line)["loss"] for line in open(Path(d) / "metrics.jsonl")]  # noqa: E731
    for a, b in zip(losses(one), losses(tmp_path / "two"), strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


# ---------------------------------------------------------------------------------------- fused AdamW
def test_fused_adamw_on_cpu_equals_the_for_loop_adamw():
    """make_optimizer's fused AdamW (CPU and CUDA) takes the same steps as torch's plain for-loop AdamW, with the
    same two weight-decay groups, over several steps of changing gradients."""
    from types import SimpleNamespace
    from nanoalign.trainer import make_optimizer
    cfg = SimpleNamespace(weight_decay=0.1, lr=1e-2, adam_beta1=0.9, adam_beta2=0.95)
    fused_model, plain_model = make("gpt2"), make("gpt2")
    fused = make_optimizer(fused_model, cfg, torch.device("cpu"))
    assert fused.defaults["fused"]
    plain = torch.optim.AdamW([{**g, "params": [dict(plain_model.named_parameters())[n] for n, p in
                                               fused_model.named_parameters() if any(p is q for q in g["params"])]}
                               for g in fused.param_groups], lr=cfg.lr, betas=(0.9, 0.95), foreach=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for a, b in zip(fused_model.parameters(), plain_model.parameters()):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    moved = 0.0
    for (name, a), b, start in zip(fused_model.named_parameters(), plain_model.parameters(), make("gpt2").parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
        moved = max(moved, (a - start).abs().max().item())
    assert moved > 1e-2  # the steps did move the weights (5 steps of lr 1e-2)


# ---------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("block", [2, 4, 256])  # two levels with whole blocks, with a shorter last block, one block
def test_inverse_cdf_sampling_matches_the_distribution_and_skips_zero_probabilities(monkeypatch, block):
    """sample_categorical vs torch.multinomial: index by hand at chosen u, zero-probability entries never drawn
    (unnormalised and top-k-filtered rows, u at the top edge), and frequencies of 200k draws within 5 standard
    errors of the probabilities."""
    from nanoalign.model import filter_logits, sample_categorical
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0]])
    cdf = [0.0, 0.2, 0.2, 0.7, 1.0, 1.0]
    real_rand = torch.rand
    for u, expected in [(0.0, 1), (0.1999, 1), (0.2001, 3), (0.69, 3), (0.71, 4), (1 - 1e-16, 4)]:
        monkeypatch.setattr(torch, "rand", lambda *a, u=u, **k: torch.full((1, 1), u, dtype=torch.float64))
        assert sample_categorical(probs, block=block).item() == expected, (u, cdf)  # the uniform drawn is u
    monkeypatch.setattr(torch, "rand", real_rand)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g)
    kept = filter_logits(logits, top_k=5).softmax(-1)                            # 45 zeros per row
    draws = torch.stack([sample_categorical(kept, g, block) for _ in range(2000)])  # (2000, 4)
    assert bool((kept.gather(1, draws.T) > 0).all())
    p = torch.tensor([[0.05, 0.15, 0.3, 0.5]]).expand(200_000, 4)
    ours = torch.bincount(sample_categorical(p * 3.0, g, block), minlength=4) / 200_000  # unnormalised rows too
    plain = torch.bincount(torch.multinomial(p, 1, generator=g)[:, 0], minlength=4) / 200_000
    se = (p[0] * (1 - p[0]) / 200_000).sqrt()
    assert bool(((ours - p[0]).abs() < 5 * se).all()) and bool(((plain - p[0]).abs() < 5 * se).all())


@pytest.mark.parametrize("block", [7, 64, 256])
def test_two_level_sampling_draws_what_one_cdf_over_all_columns_draws(block):
    """sample_categorical's block cdf + in-block cdf against the plain version, one float64 cdf over all V columns,
    at the same uniforms: the same index for every row (V = 1000: a shorter last block for each block size)."""
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(64, 1000, generator=g) ** 4                               # unnormalised, skewed
    probs[probs < 0.01] = 0.0                                                     # and zeros inside the blocks
    probs[:, 300:520] = 0.0                                                       # and whole blocks of zeros
    for seed in range(5):
        u = torch.rand(64, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        cdf = probs.double().cumsum(-1)                                           # the plain version
        plain = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
        ours = sample_categorical(probs, torch.Generator().manual_seed(seed), block)  # draws the same u
        assert torch.equal(ours, plain)
        assert bool((probs.gather(1, ours[:, None]) > 0).all())


@pytest.mark.parametrize("masked", [True, False])
def test_decode_attention_equals_the_kernel(masked):
    """generate()'s one-query attention (two matmuls) against F.scaled_dot_product_attention, grouped-query heads
    (8 query heads on 2 kv heads) and a padding mask: fp32, to rounding."""
    g = torch.Generator().manual_seed(0)
    q, (k, v) = torch.randn(5, 8, 1, 16, generator=g), torch.randn(2, 5, 2, 13, 16, generator=g)
    mask = torch.rand(5, 1, 1, 13, generator=g) > 0.3 if masked else None
    if masked:
        mask[..., -1] = True                                                      # a query always sees itself
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_head_on_last_prompt_position_and_autocast_kv_cache(name, monkeypatch):
    """generate()'s prefill runs the head only at the last prompt position, and under autocast the KV cache holds
    k, v in the autocast dtype: greedy tokens equal a plain full-recompute loop (head on every position, no cache),
    fp32 exactly and bf16 in log-probs to bf16 precision."""
    import nanoalign.model
    model = make(name).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42]]
    cache_dtypes = []
    monkeypatch.setattr(nanoalign.model, "KVCache", lambda *a: cache_dtypes.append(a[-1]) or KVCache(*a))

    def plain_greedy(prompt, n):
        seq, logps = list(prompt), []
        for _ in range(n):
            logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), -1)  # (V,) every position's logits
            seq.append(int(logp.argmax()))
            logps.append(float(logp.max()))
        return seq[len(prompt):], torch.tensor(logps)

    with torch.no_grad():
        out = model.generate(prompts, 12, temperature=0.0, eos_id=None)
        for i, p in enumerate(prompts):
            tokens, logps = plain_greedy(p, 12)
            assert out.tokens[i].tolist() == tokens
            torch.testing.assert_close(out.logprobs[i], logps, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(prompts, 12, temperature=0.0, eos_id=None)
            for i, p in enumerate(prompts):
                seq = torch.tensor([p + out.tokens[i].tolist()])
                fresh = torch.log_softmax(model(seq)[0, len(p) - 1:-1].float(), -1)       # (12, V)
                torch.testing.assert_close(out.logprobs[i], fresh.gather(1, out.tokens[i][:, None])[:, 0],
                                           rtol=0.05, atol=0.05)
    assert cache_dtypes == [torch.float32, torch.bfloat16]


class OpNames(TorchDispatchMode):
    """Records the name of every op that runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def test_packed_linears_answer_as_f_linear_inside_and_are_plain_again_after():
    """model.packed_linears: inside, every fp32 nn.Linear (the tied head too) answers inputs of at most `rows` rows
    (2-D or 3-D) with oneDNN's packed op, what F.linear answers up to summation order, and larger ones (a prefill)
    with F.linear itself; with gradients enabled or under autocast nothing is packed; after it, forward is
    nn.Linear's own."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    inputs = [(torch.randn(5, m.in_features), torch.randn(4, 1, m.in_features), torch.randn(3, 7, m.in_features))
              for m in linears]
    with torch.no_grad():
        plain = [[m(x) for x in xs] for m, xs in zip(linears, inputs)]
        with packed_linears(model, rows=5):
            for m, xs, ys in zip(linears, inputs, plain):
                for x, y in zip(xs[:2], ys[:2]):  # 5 and 4 rows: packed
                    with OpNames() as ops:
                        torch.testing.assert_close(m(x), y, rtol=1e-5, atol=1e-5)
                    assert "mkldnn._linear_pointwise.default" in ops.names
                with OpNames() as ops:
                    assert torch.equal(m(xs[2]), ys[2])  # 21 rows: F.linear
                assert not any("mkldnn" in name for name in ops.names)
        assert not any("forward" in vars(m) for m in linears)
        assert all(torch.equal(m(xs[0]), ys[0]) for m, xs, ys in zip(linears, inputs, plain))  # nn.Linear again
        with torch.autocast("cpu", dtype=torch.bfloat16), packed_linears(model, rows=5):
            assert not any("forward" in vars(m) for m in linears)  # autocast casts: left to F.linear
    with packed_linears(model, rows=5):  # gradients enabled: nothing packed (no backward through the packed op)
        assert not any("forward" in vars(m) for m in linears)


@pytest.mark.parametrize("name", CONFIGS)
def test_generate_on_packed_linears_equals_plain_generate(name):
    """set_packed_decode: generate() on prepacked weights gives the plain generate()'s greedy tokens and, sampling
    at the same seed, its tokens with log-probs within 1e-5, for GPT-2 and Llama shapes, ragged prompts, EOS."""
    model = make(name).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [40, 41, 42], [7, 7]]
    runs, packed_in_use = {}, []
    model.lm_head.register_forward_pre_hook(lambda m, args: packed_in_use.append("forward" in vars(m)))
    for packed in (False, True):
        previous = set_packed_decode(packed)
        try:
            greedy = model.generate(prompts, 12, temperature=0.0, eos_id=None)
            sampled = model.generate(prompts, 12, temperature=1.0, eos_id=3, generator=torch.Generator().manual_seed(1))
        finally:
            set_packed_decode(previous)
        runs[packed] = greedy, sampled
        assert set(packed_in_use) == {packed}
        packed_in_use.clear()
    for plain, packed in zip(runs[False], runs[True]):
        assert torch.equal(plain.tokens, packed.tokens) and torch.equal(plain.mask, packed.mask)
        torch.testing.assert_close(packed.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)


def test_packed_decode_is_faster_compares_the_two_timings():
    assert packed_decode_is_faster(32, 64, rows=4, repeats=1, margin=0.0)  # any positive time is >= 0 x the other
    assert not packed_decode_is_faster(32, 64, rows=4, repeats=1, margin=float("inf"))


# ---------------------------------------------------------------------------------------- the benchmark runs
@pytest.mark.integration
def test_benchmark_smoke_in_gpu_check_mode_on_cpu():
    """python bench/bench.py as a user runs it, in the --gpu-check mode (DPO, PPO, generate) on the CPU and the toy
    model, without compile (minutes of C++ builds on a CPU); an unknown algorithm gets a note, not a failure."""
    run = subprocess.run([sys.executable, "bench/bench.py", "--gpu-check", "--devices=cpu", "--models=toy",
                          "--compile=0", "--algos=dpo,ppo,generate,nonexistent", "--steps=1", "--warmup=0",
                          "--threads=1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {cells[5].strip(): cells for line in run.stdout.splitlines() if line.startswith("| cpu | toy")
            for cells in [line.split("|")]}
    assert set(rows) == {"dpo", "ppo rollout", "ppo update", "generate"}, run.stdout
    for cells in rows.values():
        assert cells[4].strip() == "bf16" and float(cells[10]) > 0 and float(cells[11]) > 0  # tokens/s, peak MB
    assert "nonexistent: not in the registry" in run.stdout


def test_bench_gpu_peaks_by_device_name():
    if str(ROOT / "bench") not in sys.path:  # as `python bench/bench.py` finds its modules
        sys.path.insert(0, str(ROOT / "bench"))
    from bench import datasheet_gflops
    assert datasheet_gflops("NVIDIA H200") == 989e3 and datasheet_gflops("NVIDIA A100-SXM4-80GB") == 312e3
    assert datasheet_gflops("NVIDIA L40S") == 362e3 and datasheet_gflops("NVIDIA L4") == 121e3
    assert datasheet_gflops("Some Future GPU") is None  # then the measured matmul is the MFU denominator
