"""LoRA tests: exact equality with the base at init and with adapters disabled, merged vs unmerged after training,
unmerge restores the base, only adapters train, parameter counts by hand, adapter-only state dicts round-trip."""
import copy

import pytest
import torch
import torch.nn.functional as F

from nanoalign.lora import (LoRALinear, count_parameters, disable_lora, inject_lora, is_lora_param,
                            load_lora_state_dict, lora_state_dict, mark_only_lora_trainable, merge_and_unload,
                            merge_lora, unmerge_lora)
from nanoalign.model import GPT, GPTConfig, llama_config
from nanoalign.trainer import make_optimizer

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
