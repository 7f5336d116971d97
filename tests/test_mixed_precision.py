"""bf16 done as the trainer does it, against the plain way: one autocast region per optimizer step gives the same
gradients as one region per micro-batch (for every algorithm class), the fused log-probs return the fp32 master
weight's gradient, and the reference's bf16 inference copy answers exactly as the fp32 policy under autocast."""
import contextlib
import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from nanoalign.algos import algo_config, get_algorithm
from nanoalign.config import load_config
from nanoalign.data import to_device
from nanoalign.loading import build_policy
from nanoalign.judge import LLMJudge
from nanoalign.logps import batch_logps
from nanoalign import model as model_module
from nanoalign import oaif
from nanoalign.model import GPT, GPTConfig, RewardModel, llama_config, set_attention_fp32
from nanoalign.precision import bf16_is_faster, fp32_attention_is_faster
from nanoalign.reference import Reference
from nanoalign.rollout import response_logps
from nanoalign.scorers import RewardModelScorer
from nanoalign.tokenizer import get_tokenizer
from nanoalign import trainer
from nanoalign.trainer import Context, train_step

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
BF16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
DATA = {"preference": "preference.jsonl", "binary": "binary.jsonl", "sft": "sft.jsonl", "prompt": "prompts.jsonl",
        "listwise": "listwise.jsonl"}
ALGOS = ["sft", "dpo", "kto", "orpo", "coh", "rm", "ppo", "online_dpo", "rloo", "grpo", "raft", "pro", "rrhf", "lipo",
         "npo", "tdpo", "dro", "cringe", "sdpo", "sppo", "self_reward"]


def build(name, tmp_path, **kw):
    algo_cls = get_algorithm(name)
    args = dict(algo=name, data=ROOT / "data/examples" / DATA[algo_cls.data_format], out_dir=tmp_path,
                init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2, n_embd=32, block_size=128, max_len=128,
                batch_size=8, micro_batch_size=4, max_steps=2, dtype="bfloat16", dropout=0.0, seed=3)
    keys = {f.name for f in dataclasses.fields(algo_cls.Config)} if algo_cls.Config else set()
    online = dict(reward_model="gold", max_new_tokens=6, rollout_batch_size=8)
    args.update({k: v for k, v in online.items() if k in keys})
    args.update(kw)
    cfg = load_config([f"--{k}={v}" for k, v in args.items()], algo_config)
    torch.manual_seed(cfg.seed)
    policy, tokenizer = build_policy(cfg, CPU)
    ctx = Context(CPU, 0, 1, cfg.micro_batch_size, cfg.batch_size // cfg.micro_batch_size, BF16, torch.bfloat16)
    return algo_cls(cfg, policy, tokenizer, ctx)


class GradientCapture:
    """An optimizer stand-in: step() records every trainable parameter's gradient."""

    def __init__(self, module):
        self.module, self.grads = module, None

    def step(self):
        self.grads = {n: p.grad.clone() for n, p in self.module.named_parameters() if p.grad is not None}

    def zero_grad(self, set_to_none=True):
        self.module.zero_grad(set_to_none=set_to_none)


@pytest.mark.parametrize("name", ALGOS)
def test_one_autocast_region_per_step_gives_the_gradients_of_one_region_per_micro_batch(name, tmp_path):
    """train_step casts each weight once per step and runs backward with autocast off; the plain way (autocast
    around each micro-batch's forward, backward outside) must give bit-identical gradients, and every parameter
    that gets a gradient there gets one here (a cast cached without autograd history would carry none)."""
    algo = build(name, tmp_path)
    module = algo.module
    with torch.no_grad():  # off the initial weights, so that no gradient is zero by symmetry (DPO at pi_ref)
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    step = [to_device(next(algo.batches(0)), CPU) for _ in range(algo.ctx.grad_accum)]
    for batch in step:
        if "weight" in batch:  # online DPO's ties carry no gradient: count every pair, so that there is one
            batch["weight"].fill_(1.0)
    module.zero_grad(set_to_none=True)
    for batch in step:
        with BF16():
            loss, _ = algo.loss(module, batch)
        (loss / algo.ctx.grad_accum).backward()
    plain = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    capture = GradientCapture(module)
    _, _, outcome = train_step(module, module, algo, capture, iter(step), grad_clip=0.0)
    assert outcome == "stepped" and plain and capture.grads.keys() == plain.keys()
    for n in plain:
        assert torch.equal(capture.grads[n], plain[n]), n
        assert capture.grads[n].dtype == torch.float32, n  # the master weights' dtype


def test_fused_logps_head_gradient_is_summed_in_fp32_and_returned_as_the_master_dtype():
    """Under autocast the head's matmuls run in bf16, but dL/dW comes back in fp32 without a bf16 round trip:
    it matches the fp32 computation far closer than bf16 rounding of the gradient itself (~4e-3 relative) would."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32))
    ids = torch.randint(0, 97, (4, 20))
    mask = torch.ones(4, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        batch_logps(model, ids, mask)[0].sum().backward()
    grad = model.lm_head.weight.grad
    assert grad.dtype == torch.float32
    rounded = grad.to(torch.bfloat16).float()
    assert not torch.equal(grad, rounded)  # not a bf16 value stored in fp32


# ------------------------------------------------------------------------- no-grad models stored in bf16
def tiny_model(arch):
    torch.manual_seed(0)
    make = llama_config if arch == "llama" else GPTConfig
    return GPT(make(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32,
                    **({"n_kv_head": 2} if arch == "llama" else {})))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])  # gpt2: a head tied to the embedding, which the copy unties
def test_bf16_reference_copy_answers_exactly_as_the_policy_under_autocast(arch):
    policy = tiny_model(arch)
    ids, mask = torch.randint(0, 97, (4, 20)), torch.ones(4, 20)
    reference = Reference(policy, copy=True, dtype=torch.bfloat16)
    assert reference.frozen.lm_head.weight.dtype == torch.bfloat16
    assert reference.frozen.tok_emb.weight.dtype == torch.float32  # embeddings and norms keep their dtype
    with torch.no_grad(), BF16():
        expected = batch_logps(policy, ids, mask)[0]
    assert torch.equal(reference.logps(ids, mask), expected)  # queried outside autocast: it enters its own
    fp32 = Reference(policy, copy=True).logps(ids, mask)
    assert not torch.equal(fp32, expected)  # the comparison is not vacuous: bf16 does change the numbers
    assert policy.lm_head.weight.dtype == torch.float32 and policy.lm_head.weight is policy.tok_emb.weight or \
        arch == "llama"  # the policy itself is untouched


def test_bf16_reward_model_answers_as_its_fp32_original_under_autocast():
    tok = get_tokenizer("bytes")
    torch.manual_seed(0)
    backbone = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=2, n_head=4, n_embd=32))
    rm = RewardModel(backbone)
    prompts, responses = ["the film", "a plot"], [" was good", " was dull and long"]
    with BF16():
        expected = RewardModelScorer(copy.deepcopy(rm), tok)(prompts, responses)
    scorer = RewardModelScorer(copy.deepcopy(rm), tok, dtype=torch.bfloat16)
    assert scorer.model.head.weight.dtype == torch.bfloat16
    assert torch.equal(scorer(prompts, responses), expected)


def test_judge_label_logits_give_the_log_softmax_log_odds():
    """The judge runs its head on the two label rows only: z_A - z_B equals log p(A) - log p(B) of the full
    distribution at the end of the judging prompt."""
    tok = get_tokenizer("bytes")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=2, n_head=4, n_embd=32))
    judge = LLMJudge(model, tok, "Which is better?", labels=("A", "B"))  # one byte each: the one-row path
    prompts, first, second = ["the film", "a plot"], [" was good", " was dull"], [" was bad", " was long"]
    ids = [judge.judge_prompt_ids(p, x, y) for p, x, y in zip(prompts, first, second)]
    labels = [label[0] for label in judge.label_ids]
    expected = torch.stack([model(torch.tensor([row]))[0, -1].log_softmax(-1)[labels] for row in ids])  # (N, 2)
    torch.testing.assert_close(judge.slot_logodds(prompts, first, second), expected[:, 0] - expected[:, 1],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_fp32", [False, True])
@pytest.mark.parametrize("name, tolerance", [("grpo", 0.0), ("ppo", 1e-3)])
def test_bf16_run_ratio_and_kl_at_step_0(name, tolerance, attention_fp32, tmp_path):
    """Old log-probs in a bf16 run. GRPO (like RLOO and online DPO) recomputes them with the policy under the run's
    autocast, the forward its loss runs, and the reference is the bf16 copy under the same autocast: at step 0 the
    ratio pi / pi_old is exactly 1 and the KL to the reference exactly 0. PPO keeps generate()'s incremental KV-cache
    log-probs (lm-human-preferences; recompute_logprobs=true switches): under bf16 they differ from the full
    forward's by rounding, so its first ratio is 1 within `tolerance` per token (on CPUs with native bf16 kernels;
    where bf16 is emulated the two may agree exactly). Both with attention in bf16 and in
    fp32 (set_attention_fp32, which also keeps generate()'s KV cache in fp32)."""
    set_attention_fp32(attention_fp32)
    algo = build(name, tmp_path)
    assert algo.reference.frozen.lm_head.weight.dtype == torch.bfloat16
    batch = to_device(next(algo.batches(0)), CPU)
    with torch.no_grad(), BF16():
        logp = response_logps(algo.policy, batch, algo.cfg.temperature)  # what the first update's loss computes
    mask = batch["response_mask"].bool()
    ratio = torch.exp(logp - batch["logprobs"])[mask]
    assert (ratio - 1).abs().max().item() <= tolerance
    if name == "grpo":
        assert float(algo.rollout_metrics["objective/kl"]) == 0.0
    if name == "ppo" and not attention_fp32 and trainer.cpu_has_bf16():
        # the tolerance is not slack: with native bf16 kernels (avx512_bf16 / AMX) generate's log-probs do differ.
        # With fp32 attention, or where bf16 is emulated in fp32 (an AVX2-only CPU), both paths may round alike.
        assert (ratio - 1).abs().max().item() > 0


def test_bf16_is_faster_compares_the_two_timings():
    assert bf16_is_faster(64, rows=64, repeats=1, margin=0.0)  # any positive time is >= 0 x the other
    assert not bf16_is_faster(64, rows=64, repeats=1, margin=float("inf"))


def test_auto_dtype_is_bf16_only_where_measured_faster(monkeypatch, capsys):
    model_cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32)
    assert trainer.resolve_dtype("float32", CPU, model_cfg) == "float32"
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)
    assert trainer.resolve_dtype("auto", CPU, model_cfg) == "float32"  # no native bf16: never
    assert capsys.readouterr().out == ""
    assert trainer.resolve_dtype("bfloat16", CPU, model_cfg) == "bfloat16"  # asked for: kept, with a warning
    assert "without native bf16" in capsys.readouterr().out
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: True)
    assert trainer.resolve_dtype("bfloat16", CPU, model_cfg) == "bfloat16" and capsys.readouterr().out == ""
    shapes = []
    monkeypatch.setattr(trainer, "bf16_is_faster", lambda n_embd, hidden: shapes.append((n_embd, hidden)) or True)
    assert trainer.resolve_dtype("auto", CPU, model_cfg) == "bfloat16" and shapes == [(32, 128)]  # the model's MLP
    monkeypatch.setattr(trainer, "bf16_is_faster", lambda n_embd, hidden: False)
    assert trainer.resolve_dtype("auto", CPU, model_cfg) == "float32"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_fp32_attention_changes_only_attention_arithmetic_under_autocast(arch):
    """Outside autocast an fp32 model computes bit for bit the same with set_attention_fp32 on; under bf16 autocast
    its logits and gradients change (the attention kernel's arithmetic) and stay within bf16 rounding of the logits
    and gradients with bf16 attention, as far from the fp32 model's as those are."""
    model = tiny_model(arch)
    ids = torch.randint(0, 97, (4, 24))
    mask = torch.ones(4, 24, dtype=torch.long)
    mask[:2, :5] = 0  # left padding: the masked attention path

    def logits_and_grads(autocast):
        model.zero_grad()
        with autocast():
            logits = model(ids, mask).float()  # (B, T, V)
        (logits * torch.linspace(-1, 1, 97)).sum().backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    plain = logits_and_grads(contextlib.nullcontext)
    bf16_attention = logits_and_grads(BF16)
    set_attention_fp32(True)
    fp32_outside = logits_and_grads(contextlib.nullcontext)
    fp32_attention = logits_and_grads(BF16)
    assert all(torch.equal(a, b) for a, b in zip(plain, fp32_outside))
    for i in range(2):  # logits, then gradients
        assert not torch.equal(fp32_attention[i], bf16_attention[i])
        fp32_error, bf16_error = ((x[i] - plain[i]).abs().mean() for x in (fp32_attention, bf16_attention))
        assert fp32_error < 1.25 * bf16_error  # no worse than bf16 attention (the matmuls' rounding dominates)
        torch.testing.assert_close(fp32_attention[i], bf16_attention[i], rtol=0.1, atol=0.1)  # still bf16 matmuls


def test_fp32_attention_keeps_the_kv_cache_in_fp32_and_generate_matches_the_full_forward(monkeypatch):
    """Under bf16 autocast with attention in fp32, generate() holds its KV cache in fp32 (no upcast of the cache
    per step) and its incremental log-probs match a full forward's under the same autocast (bf16 rounding apart)."""
    model, dtypes = tiny_model("llama").eval(), []
    original = model_module.KVCache

    def spy(cfg, batch_size, max_len, device, dtype):
        dtypes.append(dtype)
        return original(cfg, batch_size, max_len, device, dtype)

    monkeypatch.setattr(model_module, "KVCache", spy)
    prompts = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    for fp32 in (False, True):
        set_attention_fp32(fp32)
        with torch.no_grad(), BF16():
            out = model.generate(prompts, 8, generator=torch.Generator().manual_seed(0))
            ids = torch.cat([out.prompt_ids, out.tokens], 1)
            mask = torch.cat([out.prompt_mask, out.mask.long()], 1)
            full = model(ids, mask).float().log_softmax(-1)[:, out.prompt_ids.shape[1] - 1:-1]  # (B, new, V)
        expected = full.gather(-1, out.tokens[..., None])[..., 0] * out.mask
        torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=0.05)
    assert dtypes == [torch.bfloat16, torch.float32]


def test_fp32_attention_is_faster_compares_the_two_timings():
    assert fp32_attention_is_faster(2, 16, repeats=1, margin=0.0)
    assert not fp32_attention_is_faster(2, 16, repeats=1, margin=float("inf"))


def test_kernels_are_chosen_per_dtype_and_device_where_measured_faster(monkeypatch):
    """set_kernels: fp32 attention only in bf16 CPU runs, packed decode only in fp32 CPU runs, each only where its
    probe (monkeypatched here, recording the shapes it is asked about) says so; set process-wide."""
    model_cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32)
    asked = []
    monkeypatch.setattr(trainer, "fp32_attention_is_faster", lambda n_head, head_dim: asked.append(("attention", n_head,
                                                                                                     head_dim)) or True)
    monkeypatch.setattr(trainer, "packed_decode_is_faster", lambda n_embd, hidden: asked.append(("packed", n_embd,
                                                                                                 hidden)) or True)
    monkeypatch.setattr(trainer, "set_packed_decode", lambda enabled: asked.append(("set packed", enabled)))
    previous = set_attention_fp32(False)
    try:
        assert trainer.set_kernels("bfloat16", torch.device("cuda"), model_cfg) == (False, False)  # GPU kernels
        assert trainer.set_kernels("float32", torch.device("cuda"), model_cfg) == (False, False)
        assert asked == [("set packed", False)] * 2
        asked.clear()
        assert trainer.set_kernels("bfloat16", CPU, model_cfg) == (True, False) and model_module._attention_fp32
        assert asked == [("attention", 2, 16), ("set packed", False)]  # the model's heads
        asked.clear()
        assert trainer.set_kernels("float32", CPU, model_cfg) == (False, True) and not model_module._attention_fp32
        assert asked == [("packed", 32, 128), ("set packed", True)]  # the model's MLP
        monkeypatch.setattr(trainer, "fp32_attention_is_faster", lambda n_head, head_dim: False)
        monkeypatch.setattr(trainer, "packed_decode_is_faster", lambda n_embd, hidden: False)
        assert trainer.set_kernels("bfloat16", CPU, model_cfg) == (False, False)
        assert trainer.set_kernels("float32", CPU, model_cfg) == (False, False)
    finally:
        set_attention_fp32(previous)


def test_oaif_samples_under_bf16_autocast_only_when_its_dtype_resolved_to_bf16(monkeypatch):
    """The OAIF recipe's answers follow the resolved --dtype: no autocast for float32 (it used to force bf16, which a
    CPU without native bf16 emulates many times slower), bf16 autocast for bfloat16."""
    seen = []
    monkeypatch.setattr(oaif, "generate_rollout", lambda *args, autocast=None, **kw: seen.append(autocast))
    oaif.answers(None, None, [[1]], 4, 0.0, "float32")
    oaif.answers(None, None, [[1]], 4, 0.0, "bfloat16")
    assert seen[0] is None
    with seen[1]():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
