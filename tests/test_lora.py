"""LoRA tests: exact equality with the base at init and with adapters disabled, merged vs unmerged after training,
unmerge restores the base, only adapters train, parameter counts by hand, adapter-only state dicts round-trip;
in the training run: DPO's LoRA-as-reference == an explicit frozen copy, adapter-only checkpoints that load, merge
and resume, and 2-step CLI runs of the offline algorithms with LoRA; PERL's setup: a LoRA reward model whose
adapter-only checkpoint scores like the in-memory model, and PPO with adapters on the policy and on the critic
(started from that reward model), the reference being the policy with its adapters off."""
import contextlib
import copy
import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import nanoalign.trainer as trainer

from nanoalign.algos.dpo import DPO
from nanoalign.algos.ppo import PPO
from nanoalign.algos.rm import RewardTrainer
from nanoalign.loading import load_reward_model
from nanoalign.checkpoint import load_checkpoint, save_checkpoint
from nanoalign.config import load_config
from nanoalign.loading import apply_lora, gpt_modules, load_model, merged_state_dict
from nanoalign.loading import main as lora_main  # the merge command
from nanoalign.logps import batch_logps
from nanoalign.lora import (LoRALinear, count_parameters, disable_lora, inject_lora, is_lora_param,
                            load_lora_state_dict, lora_layers, lora_state_dict, mark_only_lora_trainable,
                            merge_and_unload, merge_lora, unmerge_lora)
from nanoalign.model import GPT, GPTConfig, llama_config
from nanoalign.reference import Reference
from nanoalign.rollout import response_logps
from nanoalign.scorers import RewardModelScorer
from nanoalign.tokenizer import get_tokenizer
from nanoalign.loading import build_policy
from nanoalign.trainer import Context, make_optimizer, train
from nanoalign.algos import algo_config
from train import main as train_main

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "gpt2": GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32),
    "llama": llama_config(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
}
TARGETS = {"gpt2": ["q_proj", "v_proj"], "llama": ["q_proj", "v_proj", "up_proj"]}


def make_pair(name, rank=4, alpha=8.0, dropout=0.0, seed=0):
    """(base model, LoRA model built on a deep copy of the same weights)."""
    torch.manual_seed(seed)
    base = GPT(CONFIGS[name])
    lora = copy.deepcopy(base)
    inject_lora(lora, rank, alpha, dropout, TARGETS[name])
    mark_only_lora_trainable(lora)
    return base, lora


def batch(seed=1):
    return torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, idx):
    logits = model(idx[:, :-1])                                                # (B, T-1, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))


def train_steps(model, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for s in range(steps):
        lm_loss(model, batch(seed=10 + s)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", CONFIGS)
def test_init_logits_equal_base_exactly(name):
    base, lora = make_pair(name, dropout=0.1)  # B = 0, so even the dropout path adds exact zeros
    idx = batch()
    for mode in ("eval", "train"):
        getattr(base, mode)(), getattr(lora, mode)()
        assert torch.equal(base(idx), lora(idx))


@pytest.mark.parametrize("name", CONFIGS)
def test_merged_equals_unmerged_and_unmerge_restores_base(name):
    base, lora = make_pair(name)
    train_steps(lora)
    frozen = {k: v for k, v in lora.state_dict().items() if not is_lora_param(k)}
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in frozen.items())  # training never touched the base
    lora.eval()
    idx = batch()
    unmerged = lora(idx)
    assert not torch.allclose(unmerged, base.eval()(idx), atol=1e-4)           # the adapters did learn something
    merge_lora(lora)
    assert all(m.merged for m in lora.modules() if isinstance(m, LoRALinear))
    assert torch.allclose(lora(idx), unmerged, atol=1e-5)
    unmerge_lora(lora)
    for k, v in base.state_dict().items():
        assert torch.allclose(lora.state_dict()[k], v, atol=1e-6), k
    assert torch.allclose(lora(idx), unmerged, atol=1e-6)


@pytest.mark.parametrize("name", CONFIGS)
def test_disabled_equals_base_exactly_mid_training(name):
    base, lora = make_pair(name, dropout=0.2)
    train_steps(lora, steps=2)
    base.train(), lora.train()                      # mid-training: train mode, LoRA dropout active when enabled
    idx = batch()
    with disable_lora(lora):
        assert torch.equal(lora(idx), base(idx))
    assert all(not m.disabled for m in lora.modules() if isinstance(m, LoRALinear))  # restored on exit
    lora.eval(), base.eval()
    assert not torch.allclose(lora(idx), base(idx), atol=1e-4)
    merge_lora(lora)
    with pytest.raises(RuntimeError, match="merged"):
        with disable_lora(lora):
            pass


@pytest.mark.parametrize("name", CONFIGS)
def test_only_lora_params_get_gradients_and_are_optimised(name):
    base, lora = make_pair(name)
    train_steps(lora, steps=1)  # B != 0 now, so A's gradient (proportional to B^T) is non-zero too
    lm_loss(lora, batch()).backward()
    for n, p in lora.named_parameters():
        assert p.requires_grad == is_lora_param(n), n
        assert (p.grad is not None) == is_lora_param(n), n
        assert p.grad is None or p.grad.abs().sum() > 0, n
    cfg = type("Cfg", (), dict(weight_decay=0.1, lr=1e-3, adam_beta1=0.9, adam_beta2=0.95))()
    optimised = {id(p) for g in make_optimizer(lora, cfg, torch.device("cpu")).param_groups for p in g["params"]}
    assert optimised == {id(p) for n, p in lora.named_parameters() if is_lora_param(n)}


def test_trainable_parameter_count_by_hand():
    """rank r = 4, n_embd = 32, head_dim = 8, 2 layers.
    gpt2, targets q_proj (32 -> 32) and v_proj (32 -> 32): each adds A (r, 32) + B (32, r) = 64 r = 256,
        so 2 layers * 2 * 256 = 1024 trainable.
    llama, n_kv_head = 2 -> v_proj is 32 -> 16: 32 r + 16 r = 192; q_proj 256; up_proj 32 -> 128: 160 r = 640;
        2 layers * (256 + 192 + 640) = 2176 trainable.
    The total is the base's (tied embedding counted once) plus the adapters."""
    for name, expected in (("gpt2", 1024), ("llama", 2176)):
        base, lora = make_pair(name)
        trainable, total = count_parameters(lora)
        assert trainable == expected
        assert total == base.num_params() + expected


@pytest.mark.parametrize("name", CONFIGS)
def test_lora_state_dict_holds_only_adapters_and_round_trips(name):
    base, lora = make_pair(name)
    train_steps(lora, steps=2)
    sd = lora_state_dict(lora)
    n_wrapped = 2 * len(TARGETS[name])  # 2 layers
    assert len(sd) == 2 * n_wrapped and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in sd)
    _, fresh = make_pair(name, seed=0)           # same base, new (untrained) adapters
    load_lora_state_dict(fresh, sd)
    idx = batch()
    assert torch.equal(fresh.eval()(idx), lora.eval()(idx))
    with pytest.raises(KeyError, match="adapter keys differ"):
        load_lora_state_dict(fresh, {k: v for k, v in list(sd.items())[1:]})


def test_merge_and_unload_gives_a_plain_gpt():
    base, lora = make_pair("llama")
    train_steps(lora, steps=2)
    idx = batch()
    expected = lora.eval()(idx)
    plain = GPT(CONFIGS["llama"])
    plain.load_state_dict(merge_and_unload(lora).state_dict())  # strict: no adapter keys left, none missing
    assert torch.allclose(plain.eval()(idx), expected, atol=1e-5)


def test_inject_errors_name_the_available_layers_and_refuse_tied_head():
    torch.manual_seed(0)
    model = GPT(CONFIGS["gpt2"])
    with pytest.raises(ValueError, match=r"'qkv' matches no linear layer.*'down_proj'.*'q_proj'"):
        inject_lora(model, 4, 8.0, 0.0, ["qkv"])
    with pytest.raises(ValueError, match="tied"):
        inject_lora(copy.deepcopy(model), 4, 8.0, 0.0, ["lm_head"])
    names = inject_lora(model, 4, 8.0, 0.0, "attn.o_proj, down_proj")
    assert names == ["blocks.0.attn.o_proj", "blocks.0.mlp.down_proj", "blocks.1.attn.o_proj", "blocks.1.mlp.down_proj"]
    with pytest.raises(ValueError, match="twice"):
        inject_lora(model, 4, 8.0, 0.0, ["q_proj"])
    untied = GPT(CONFIGS["llama"])
    assert inject_lora(untied, 4, 8.0, 0.0, ["lm_head"]) == ["lm_head"]  # allowed when asked for and not tied


# --- LoRA in the training run ---

WORDS = "the a film plot was good bad very not really great dull and but acting music".split()


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A preference file (24 pairs) and a pretrained base checkpoint (a random 1-layer GPT on the bytes tokenizer)."""
    root = tmp_path_factory.mktemp("lora_run")
    rng = random.Random(0)

    def phrase():
        return " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
    rows = [{"prompt": phrase().strip(), "chosen": phrase(), "rejected": phrase()} for _ in range(24)]
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=get_tokenizer("bytes").vocab_size, block_size=96, n_layer=1, n_head=2, n_embd=32)
    base = GPT(cfg)
    save_checkpoint(root / "base" / "ckpt.pt", model=base.state_dict(), model_config=asdict(cfg), tokenizer="bytes",
                    kind="policy")
    return root


def run_args(root, out_dir, **kw):
    args = dict(algo="dpo", data=root / "prefs.jsonl", out_dir=out_dir, init_from=f"ckpt:{root / 'base'}",
                max_len=80, batch_size=8, micro_batch_size=4, lr=3e-2, warmup_steps=1, max_steps=2, log_interval=1,
                dtype="float32", dropout=0.0, seed=3, lora_rank=4, lora_alpha=8, lora_targets="q_proj,v_proj")
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def test_dpo_lora_reference_equals_an_explicit_frozen_copy_of_the_base(run_files, tmp_path):
    cfg = load_config(run_args(run_files, tmp_path, ref_logps="live"), algo_config)
    policy, tokenizer = build_policy(cfg, torch.device("cpu"))  # the adapters come with the run's policy
    assert [n for n, m in policy.named_modules() if isinstance(m, LoRALinear)] == ["blocks.0.attn.q_proj",
                                                                                  "blocks.0.attn.v_proj"]
    assert apply_lora(policy, cfg) == []  # a GPT that has adapters gets no second set
    dpo = DPO(cfg, policy, tokenizer, Context(torch.device("cpu"), 0, 1, 4, 1, contextlib.nullcontext))
    assert dpo.reference.frozen is None  # no second copy of the weights
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-2)
    policy.train()
    for i in range(3):  # the adapters move the policy away from the base
        dpo.loss(policy, dpo.collate(dpo.examples[4 * i:4 * i + 4]))[0].backward()
        opt.step()
        opt.zero_grad()
    batch = dpo.collate(dpo.examples[12:16])
    lora_loss, lora_metrics = dpo.loss(policy, batch)
    frozen_base = load_model(f"ckpt:{run_files / 'base'}")[0]
    dpo.reference = Reference(frozen_base, copy=True)  # the explicit frozen copy, as without LoRA
    assert dpo.reference.frozen is not None
    copy_loss, copy_metrics = dpo.loss(policy, batch)
    assert torch.equal(lora_loss, copy_loss) and lora_metrics == copy_metrics
    policy_logps = batch_logps(policy.eval(), batch["input_ids"], batch["loss_mask"])[0]
    ref_logps = dpo.reference.logps(batch["input_ids"], batch["loss_mask"])
    assert not torch.allclose(policy_logps, ref_logps, atol=1e-3)  # pi != pi_ref: the check above has teeth


def test_lora_checkpoint_holds_adapters_loads_merges_and_resumes(run_files, tmp_path):
    straight = train(load_config(run_args(run_files, tmp_path / "a", max_steps=4), algo_config), DPO)
    ckpt = load_checkpoint(straight)
    assert set(ckpt["model"]) == {f"blocks.0.attn.{p}_proj.lora_{m}.weight" for p in "qv" for m in "AB"}
    assert ckpt["lora"] == dict(base=f"ckpt:{(run_files / 'base').resolve()}", rank=4, alpha=8.0,
                                targets=["q_proj", "v_proj"], prefixes=[""], reward_trunks={})
    assert len(ckpt["optimizer"]["state"]) == 4  # AdamW state for the four adapter matrices only

    by_hand = load_model(f"ckpt:{run_files / 'base'}")[0]  # base + (alpha / r) B A, done here by hand
    for p in "qv":
        layer = by_hand.blocks[0].attn.get_submodule(f"{p}_proj")
        A, B = ckpt["model"][f"blocks.0.attn.{p}_proj.lora_A.weight"], ckpt["model"][f"blocks.0.attn.{p}_proj.lora_B.weight"]
        layer.weight.data += 2.0 * B @ A
    idx = torch.randint(0, 200, (2, 20), generator=torch.Generator().manual_seed(0))
    loaded = load_model(f"ckpt:{straight}")[0].eval()  # what sample.py and the next stage's init_from get
    assert torch.allclose(loaded(idx), by_hand.eval()(idx), atol=1e-6)
    merged_dir = tmp_path / "merged"
    lora_main(["merge", str(straight), str(merged_dir)])  # python -m nanoalign.lora merge <run> <out>
    full = load_checkpoint(merged_dir)
    assert "lora" not in full and "optimizer" not in full and len(full["model"]) == len(by_hand.state_dict())
    assert torch.equal(load_model(f"ckpt:{merged_dir}")[0].eval()(idx), loaded(idx))

    halves = tmp_path / "b"
    train(load_config(run_args(run_files, halves, max_steps=4), algo_config), DPO, stop_after=2)
    train(load_config(run_args(run_files, halves, max_steps=4, resume=True), algo_config), DPO)
    resumed = load_checkpoint(halves)["model"]
    assert all(torch.equal(resumed[k], v) for k, v in ckpt["model"].items())


@pytest.mark.integration
def test_cli_dpo_two_steps_with_lora(run_files, tmp_path):
    out = tmp_path / "dpo"
    run = subprocess.run([sys.executable, "train.py", *run_args(run_files, out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "512 trainable parameters" in run.stdout  # q_proj, v_proj (32 -> 32) at rank 4: 2 * (4*32 + 32*4)
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and all(is_lora_param(k) for k in ckpt["model"])
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(records) == 2 and all(r["loss"] == r["loss"] for r in records)  # logged, not NaN


@pytest.mark.parametrize("algo,extra", [("dpo", {"ref_logps": "live"}), ("kto", {}), ("orpo", {}), ("ipo", {})])
def test_two_steps_with_lora_for_other_algorithms(run_files, tmp_path, algo, extra):
    """The same wiring, in process (train.py's main), for the other offline algorithms."""
    out = train_main(run_args(run_files, tmp_path / algo, algo=algo, **extra))
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["lora"]["rank"] == 4 and all(is_lora_param(k) for k in ckpt["model"])
    assert len([json.loads(line) for line in open(Path(out) / "metrics.jsonl")]) == 2


@pytest.mark.parametrize("algo,extra", [("dpo", {"ref_logps": "live"}), ("dpo", {}),
                                        ("ppo", dict(reward_model="gold", rollout_batch_size=8, epochs=1,
                                                     max_new_tokens=6, max_steps=4, dropout=0.1))])
def test_bf16_lora_run_stores_its_frozen_base_in_bf16_and_trains_as_without(run_files, tmp_path, monkeypatch, algo,
                                                                           extra):
    """In a bf16 LoRA run the frozen base's linear weights are stored in bf16 once (precision.cast_frozen_linears_):
    under the run's autocast every loss, metric and adapter update is bit-identical to the run that leaves them fp32
    and lets autocast cast them on every step, for the policy, the reference (adapters off) and PPO's critic; the
    checkpoint holds the fp32 adapters only."""
    kept = []

    def keep(module, dtype):  # the trainer's call, recorded: the module as the run trains it
        kept.append((trainer_cast(module, dtype), module))
    trainer_cast = trainer.cast_frozen_linears_
    monkeypatch.setattr(trainer, "cast_frozen_linears_", keep)
    cast = train_main(run_args(run_files, tmp_path / "cast", algo=algo, dtype="bfloat16", **extra))
    monkeypatch.setattr(trainer, "cast_frozen_linears_", lambda module, dtype: None)
    plain = train_main(run_args(run_files, tmp_path / "plain", algo=algo, dtype="bfloat16", **extra))
    (elements, module), = kept
    assert elements > 0 and {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    assert sum(p.numel() for p in module.parameters() if p.dtype == torch.bfloat16) == elements
    assert all(p.dtype == torch.float32 for n, p in module.named_parameters() if "emb" in n or "norm" in n)
    assert all(m.weight.dtype == torch.bfloat16 for m in lora_layers(module))  # the base under the adapters
    records = [[json.loads(line) for line in open(Path(out) / "metrics.jsonl")] for out in (cast, plain)]
    drop_time = lambda rs: [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rs]  # noqa: E731
    assert drop_time(records[0]) == drop_time(records[1]) and len(records[0]) == extra.get("max_steps", 2)
    saved, expected = load_checkpoint(cast)["model"], load_checkpoint(plain)["model"]
    assert saved.keys() == expected.keys() and all(v.dtype == torch.float32 for v in saved.values())
    assert all(torch.equal(saved[k], expected[k]) for k in saved)


def test_lora_from_scratch_is_refused(run_files, tmp_path):
    with pytest.raises(ValueError, match="pretrained"):
        train_main(run_args(run_files, tmp_path, init_from="scratch", tokenizer="bytes"))


# --- PERL's setup: LoRA on the reward model, then on PPO's policy and critic ---

def adapter_keys(prefix=""):
    return {f"{prefix}blocks.0.attn.{p}_proj.lora_{m}.weight" for p in "qv" for m in "AB"}


@pytest.fixture(scope="module")
def lora_reward_model(run_files, tmp_path_factory):
    """--algo=rm with LoRA for 2 steps: (its out dir, the RewardModel as it was in memory at the end of the run)."""
    kept = []

    class KeepModule(RewardTrainer):
        def finish(self, model):
            super().finish(model)  # the normalisation statistics are set here
            kept.append(self.module)
    out = train(load_config(run_args(run_files, tmp_path_factory.mktemp("rm"), algo="rm"), algo_config), KeepModule)
    return out, kept[0]


def test_rm_with_lora_trains_adapters_and_head_and_its_checkpoint_loads_as_the_same_reward_model(
        run_files, lora_reward_model, tmp_path):
    out, in_memory = lora_reward_model
    trainable = {n for n, p in in_memory.named_parameters() if p.requires_grad}
    assert trainable == adapter_keys("backbone.") | {"head.weight", "head.bias"}  # the scalar head trains fully
    ckpt = load_checkpoint(out)
    assert ckpt["kind"] == "reward" and ckpt["lora"]["prefixes"] == ["backbone."]
    assert set(ckpt["model"]) == trainable | {"reward_mean", "reward_std"}  # adapters, head, normalisation only
    assert len(ckpt["optimizer"]["state"]) == 6  # AdamW state for the 4 adapter matrices and the head's 2 tensors

    loaded, tokenizer = load_reward_model(f"ckpt:{out}")  # the base's weights + merged adapters + head
    rows = [json.loads(line) for line in open(run_files / "prefs.jsonl")]
    prompts, completions = [r["prompt"] for r in rows] * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    scores = RewardModelScorer(loaded, tokenizer)(prompts, completions)
    assert abs(scores.mean().item()) < 1e-4 and abs(scores.std().item() - 1) < 1e-4  # normalised on these samples
    assert torch.allclose(scores, RewardModelScorer(in_memory, tokenizer)(prompts, completions), atol=1e-5)
    with disable_lora(in_memory):  # the adapters matter: without them the scores differ
        assert not torch.allclose(scores, RewardModelScorer(in_memory, tokenizer)(prompts, completions), atol=1e-3)
    lora_main(["merge", str(out), str(tmp_path / "merged")])  # a full reward-model checkpoint, no base needed
    merged, _ = load_reward_model(f"ckpt:{tmp_path / 'merged'}")
    assert torch.allclose(RewardModelScorer(merged, tokenizer)(prompts, completions), scores, atol=1e-5)


def test_ppo_with_lora_reference_is_the_policy_with_adapters_off(run_files, tmp_path):
    cfg = load_config(run_args(run_files, tmp_path, algo="ppo", reward_model="gold", rollout_batch_size=8,
                               epochs=1, max_new_tokens=6), algo_config)
    policy, tokenizer = build_policy(cfg, torch.device("cpu"))  # with adapters
    ppo = PPO(cfg, policy, tokenizer, Context(torch.device("cpu"), 0, 1, 4, 2, contextlib.nullcontext))
    apply_lora(ppo.module, cfg)  # what the trainer does: the critic (a copy of the policy's trunk) gets adapters
    assert list(gpt_modules(ppo.module)) == ["policy.", "critic.backbone."]
    assert ppo.reference.frozen is None  # pi_ref is the policy with its adapters off, not a frozen copy
    assert len(lora_layers(ppo.module.critic)) == 2 and ppo.module.critic.backbone is not policy
    with torch.no_grad():
        for layer in lora_layers(policy):  # move the policy away from the base (B = 0 would hide a wrong reference)
            layer.lora_B.weight.normal_(0, 0.5)
    batch = next(ppo.batches(0))  # a rollout of the moved policy
    frozen_base = load_model(f"ckpt:{run_files / 'base'}")[0].eval()
    ref = ppo.reference.response_logps(batch)
    assert torch.allclose(ref, response_logps(frozen_base, batch), atol=1e-6)
    assert not torch.allclose(ref, response_logps(policy.eval(), batch), atol=1e-3)
    assert ppo.rollout_metrics["objective/kl"].item() > 1e-3  # the rollout's KL penalty used the same reference


@pytest.mark.integration
def test_cli_ppo_two_steps_with_lora_on_policy_and_critic_from_a_lora_reward_model(
        run_files, lora_reward_model, tmp_path, capsys):
    """PERL: the reward model, the policy and the critic (initialised from the reward model) all train adapters.
    The CLI's main in process (test_cli_dpo_two_steps_with_lora covers the subprocess; this saves its start-up)."""
    rm_dir, _ = lora_reward_model
    out = train_main(run_args(run_files, tmp_path / "ppo", algo="ppo", reward_model=f"ckpt:{rm_dir}",
                              rollout_batch_size=8, epochs=1, max_new_tokens=6))
    assert "1,057 trainable parameters" in capsys.readouterr().out  # 2 x 512 adapters (policy, critic) + head 33
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and len(ckpt["optimizer"]["state"]) == 10  # 8 adapter matrices + the value head
    assert set(ckpt["model"]) == (adapter_keys("policy.") | adapter_keys("critic.backbone.") |
                                  {"critic.head.weight", "critic.head.bias", "critic.reward_mean", "critic.reward_std"})
    assert ckpt["lora"]["reward_trunks"] == {"critic.backbone.": f"ckpt:{Path(rm_dir).resolve()}"}
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(records) == 2 and all(v == v for r in records for v in r.values())  # logged, not NaN

    full = merged_state_dict(ckpt)  # the critic's trunk starts from the reward model's, the policy's from the base
    reward_model, _ = load_reward_model(f"ckpt:{rm_dir}")
    starts = {"policy.": load_model(f"ckpt:{run_files / 'base'}")[0], "critic.backbone.": reward_model.backbone}
    for prefix, start in starts.items():
        for p in "qv":
            layer = f"{prefix}blocks.0.attn.{p}_proj."
            A, B = ckpt["model"][layer + "lora_A.weight"], ckpt["model"][layer + "lora_B.weight"]
            by_hand = start.blocks[0].attn.get_submodule(f"{p}_proj").weight + 2.0 * B @ A  # alpha / r = 8 / 4
            assert torch.allclose(full[layer + "weight"], by_hand, atol=1e-6), layer
    base_q, reward_q = (start.blocks[0].attn.q_proj.weight for start in starts.values())
    assert not torch.allclose(base_q, reward_q, atol=1e-3)  # the two starts differ: the check above has teeth
    assert isinstance(load_model(f"ckpt:{out}")[0], GPT)  # the policy loads for sampling / the next stage


# --- the benchmark's lora key (python bench/bench.py --lora=0,16): configuration and what it counts ---

def bench_modules():
    """bench/bench.py and bench/common.py, imported as `python bench/bench.py` finds them (bench/ on sys.path)."""
    folder = str(Path(__file__).resolve().parents[1] / "bench")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import bench
    import common
    return bench, common


@pytest.mark.integration
def test_bench_lora_key_configures_the_run_as_the_cli_does_and_counts_adapter_state_only(tmp_path):
    """The toy benchmark model: 4 layers, n_embd 128, adapters on q/k/v/o_proj (TrainConfig's default targets), each
    128 -> 128 at rank 4: A (4, 128) + B (128, 4) = 1024, so 4 layers * 4 * 1024 = 16384 trainable parameters.
    AdamW keeps exp_avg and exp_avg_sq (fp32) and a 4-byte step counter per trained tensor; one fp32 gradient each."""
    bench, common = bench_modules()
    cpu = torch.device("cpu")
    spec = dict(algo="dpo", model="toy", dtype="fp32", device="cpu", logps="fused", bucket="1", ref_logps="live",
                compile="0", lora="4", lora_targets="", warmup=0, steps=1, ckpt="0", decode="auto")
    switches = ["--fused_logps=True", "--bucket_by_length=True", "--activation_checkpointing=False"]
    assert common.switch_args({**spec, "lora": "0"}) == switches
    assert common.switch_args(spec) == switches + ["--lora_rank=4", "--lora_alpha=8"]
    assert common.switch_args({**spec, "lora_targets": "q_proj,up_proj"})[-1] == "--lora_targets=q_proj,up_proj"
    assert common.switch_args({**spec, "logps": "plain", "bucket": "0"})[:2] == ["--fused_logps=False",
                                                                                 "--bucket_by_length=False"]
    workload = dict(prompt=(4, 8), completion=(4, 12), batch=4, micro=2)
    algo, cfg = common.make_algorithm(spec, cpu, common.build_model("toy", cpu), contextlib.nullcontext, tmp_path,
                                      workload)
    assert (cfg.lora_rank, cfg.lora_alpha) == (4, 8.0) and len(lora_layers(algo.policy)) == 16
    assert algo.reference.frozen is None  # the live reference is the policy with adapters off: no copy

    lora = common.time_algorithm(spec, cpu, common.build_model("toy", cpu), contextlib.nullcontext, tmp_path, workload)
    assert lora["trainable"] == 16384
    assert lora["optimizer_state_bytes"] == 2 * 4 * 16384 + 4 * 32 and lora["grad_bytes"] == 4 * 16384
    model = common.build_model("toy", cpu)
    n_params, n_tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    full = common.time_algorithm({**spec, "lora": "0"}, cpu, model, contextlib.nullcontext, tmp_path, workload)
    assert full["trainable"] == n_params
    assert full["optimizer_state_bytes"] == 2 * 4 * n_params + 4 * n_tensors and full["grad_bytes"] == 4 * n_params

    first = dict(logps="fused", bucket="1", ref_logps="precompute", compile="0", lora="0", ckpt="0", decode="auto")
    assert bench.relevant("dpo", {**first, "ref_logps": "live"}, first)
    assert not bench.relevant("rm", {**first, "ref_logps": "live"}, first)  # rm has no reference: a repeated row
    assert bench.relevant("rm", {**first, "lora": "16"}, first)
    assert not bench.relevant("generate", {**first, "lora": "16"}, first)  # generation trains nothing
    assert bench.relevant("generate", {**first, "decode": "packed"}, first)  # but its decode kernel is a switch
    row = dict(device="cpu", model="toy", dtype="fp32", algo="rm", variant="default", **first, peak_mb=1000.0,
               run_mb=400.0, step_s=2.0, trainable=1000)
    lines = bench.ratio_lines([row, {**row, "lora": "16", "variant": "lora=16", "peak_mb": 800.0, "run_mb": 100.0,
                                     "step_s": 1.5, "trainable": 10}])
    assert lines == ["ratio LoRA r=16 / full, toy fp32 rm (default): peak MB 0.80 (800 / 1000), run MB 0.25 "
                     "(100 / 400), step s 0.75 (1.500 / 2.000), trainable 0.0100"]
