"""LoRA adapters exported in PEFT's format (`python -m nanoalign.hf export --peft`): tiny random HF models built here
(nothing downloaded) are loaded through hf:, given random non-zero adapters and exported. Checked two ways:
by hand (key names, adapter_config.json, and W + (alpha / r) B A applied to the HF weights gives nanoalign's
logits in `transformers`) and, where `peft` is installed, with PeftModel.from_pretrained(base, adapter dir)."""
import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from nanoalign.checkpoint import save_checkpoint  # noqa: E402
from nanoalign.hf.__main__ import main  # noqa: E402
from nanoalign.hf.weights import load_hf_model  # noqa: E402
from nanoalign.loading import trainable_state  # noqa: E402
from nanoalign.lora import inject_lora, lora_layers, mark_only_lora_trainable  # noqa: E402

transformers.logging.set_verbosity_error()
RANK, ALPHA = 4, 8.0
CASES = {  # HF config class and kwargs, nanoalign LoRA targets
    "llama": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
              "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"),
    # q, v -> one c_attn adapter of rank 2r; attn.o_proj -> attn.c_proj only (mlp.c_proj has the same short name)
    "gpt2": ("GPT2Config", dict(n_positions=64, n_embd=32, n_layer=2, n_head=4), "q_proj,v_proj,attn.o_proj,up_proj"),
}


def save_tokenizer(model_dir):
    """A byte-level BPE (GPT-2 layout) that fills the model's vocabulary, so nanoalign adds a PAD row on load."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(model_dir)
    return tok.get_vocab_size()


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory):
    """(case, base dir, nanoalign LoRA model, adapter dir): the adapters have random A and random B."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    config_class, kwargs, targets = CASES[name]
    config = getattr(transformers, config_class)(**kwargs, vocab_size=save_tokenizer(root / "base"),
                                                 initializer_range=0.2, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "base")
    model, tok = load_hf_model(root / "base")
    assert model.cfg.vocab_size == config.vocab_size + 1  # the PAD row: lm_head's B has one row too many
    inject_lora(model, RANK, ALPHA, targets=targets)
    mark_only_lora_trainable(model)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.weight.normal_(0, 0.5)  # B = 0 would export zeros and hide any mix-up
    run_cfg = SimpleNamespace(init_from=f"hf:{root / 'base'}", lora_rank=RANK, lora_alpha=ALPHA, lora_targets=targets)
    save_checkpoint(root / "run" / "ckpt.pt", **trainable_state(model, run_cfg), model_config=asdict(model.cfg),
                    tokenizer=tok.spec, kind="policy", config={"lora_dropout": 0.05})
    main(["export", f"--ckpt={root / 'run'}", f"--out={root / 'adapter'}", "--peft"])
    return name, root / "base", model.eval(), root / "adapter"


def logits_pair(model, hf_model, V):
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids)[..., :V], hf_model(ids).logits  # nanoalign's PAD logit is not HF's


def test_keys_and_config_by_hand(exported):
    """Expected names: HF's module names under PEFT's base_model.model. prefix. Llama: all 7 projections of 2
    layers + lm_head = 15 modules; GPT-2: c_attn, attn.c_proj, mlp.c_fc of 2 layers = 6 modules. c_attn's rank is
    2 r = 8 (q and v adapters side by side) with alpha 2 * 8 = 16, so its scale stays 16 / 8 = 8 / 4."""
    name, base_dir, model, adapter_dir = exported
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = safetensors_torch.load_file(adapter_dir / "adapter_model.safetensors")
    if name == "llama":
        modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"] + \
                  [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")] + ["lm_head"]
        targets = ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj", "v_proj"]
        patterns = {}
    else:
        modules = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")]
        targets = ["c_attn", "c_fc", "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
        patterns = {"c_attn": 2 * RANK}
    assert set(tensors) == {f"base_model.model.{m}.lora_{ab}.weight" for m in modules for ab in "AB"}
    assert config == dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=str(base_dir.resolve()),
                          r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=targets, bias="none",
                          fan_in_fan_out=name == "gpt2", use_rslora=False, use_dora=False, modules_to_save=None,
                          rank_pattern=patterns, alpha_pattern={k: 2 * ALPHA for k in patterns}, inference_mode=True)
    if name == "llama":  # GQA: k_proj is 32 -> 16; lm_head has the HF vocabulary's rows, not nanoalign's PAD row
        assert tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (16, RANK)
        assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (model.cfg.vocab_size - 1, RANK)
    else:  # c_attn: B (3C, 2r) with B_q in rows 0:C, columns 0:r; B_v in rows 2C:3C, columns r:2r; k rows zero
        A = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
        B = tensors["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
        attn = model.blocks[0].attn
        assert A.shape == (2 * RANK, 32) and B.shape == (96, 2 * RANK)
        assert torch.equal(A, torch.cat([attn.q_proj.lora_A.weight, attn.v_proj.lora_A.weight]))
        assert torch.equal(B[:32, :RANK], attn.q_proj.lora_B.weight)
        assert torch.equal(B[64:, RANK:], attn.v_proj.lora_B.weight)
        assert B[32:64].abs().sum() == 0 and B[:32, RANK:].abs().sum() == 0 and B[64:, :RANK].abs().sum() == 0


def test_adapters_applied_by_hand_to_the_hf_weights_give_nanoalign_logits(exported):
    """W <- W + (alpha_m / r_m) B A on each HF module (transposed for GPT-2's (in, out) Conv1D), read from the
    exported files alone, then transformers' logits == nanoalign's LoRA logits."""
    name, base_dir, model, adapter_dir = exported
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = safetensors_torch.load_file(adapter_dir / "adapter_model.safetensors")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    state = hf_model.state_dict()
    for key, A in tensors.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            leaf = module.rpartition(".")[2]
            r = config["rank_pattern"].get(leaf, config["r"])
            alpha = config["alpha_pattern"].get(leaf, config["lora_alpha"])
            delta = alpha / r * tensors[key.replace("lora_A", "lora_B")] @ A     # (out, in)
            state[module + ".weight"] += delta.t() if config["fan_in_fan_out"] else delta
    hf_model.load_state_dict(state)
    ours, theirs = logits_pair(model, hf_model, hf_model.config.vocab_size)
    assert (ours - theirs).abs().max() <= 1e-4
    base_logits = logits_pair(model, transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval(),
                              hf_model.config.vocab_size)[1]
    assert (ours - base_logits).abs().max() > 1e-2  # the adapters change the model: the check above has teeth


def test_peft_loads_the_adapter_and_gives_nanoalign_logits(exported):
    peft = pytest.importorskip("peft")
    name, base_dir, model, adapter_dir = exported
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    n_adapted = sum(isinstance(m, peft.tuners.lora.LoraLayer) for m in peft_model.modules())
    assert n_adapted == {"llama": 15, "gpt2": 6}[name]  # every exported adapter found its module, no others
    ours, theirs = logits_pair(model, peft_model, base.config.vocab_size)
    assert (ours - theirs).abs().max() <= 1e-4


def test_refusals_say_what_to_do_instead(exported, tmp_path):
    _, base_dir, model, adapter_dir = exported
    not_lora = tmp_path / "full.pt"
    save_checkpoint(not_lora, model={}, model_config=asdict(model.cfg), tokenizer="bytes", kind="policy")
    with pytest.raises(ValueError, match="not a LoRA checkpoint.*without --peft"):
        main(["export", f"--ckpt={not_lora}", f"--out={tmp_path / 'a'}", "--peft"])
    run = torch.load(adapter_dir.parent / "run" / "ckpt.pt", weights_only=True)
    save_checkpoint(tmp_path / "ckpt_base.pt", **{**run, "lora": {**run["lora"], "base": "ckpt:/runs/sft"}})
    with pytest.raises(ValueError, match="not an hf:<dir>.*merged model without --peft"):
        main(["export", f"--ckpt={tmp_path / 'ckpt_base.pt'}", f"--out={tmp_path / 'b'}", "--peft"])
    save_checkpoint(tmp_path / "reward.pt", **{**run, "kind": "reward"})
    with pytest.raises(ValueError, match="'reward'.*only policy adapters"):
        main(["export", f"--ckpt={tmp_path / 'reward.pt'}", f"--out={tmp_path / 'c'}", "--peft"])


def test_an_actor_critic_run_exports_its_policy_adapters_only(exported, tmp_path):
    """PPO stores the policy under "policy." next to a critic with adapters of its own: only the policy's export,
    the same tensors as the plain run's; --dtype casts them."""
    _, _, _, adapter_dir = exported
    run = torch.load(adapter_dir.parent / "run" / "ckpt.pt", weights_only=True)
    weights = {f"{module}.{k}": v if module == "policy" else -v
               for module in ("policy", "critic") for k, v in run["model"].items()}
    save_checkpoint(tmp_path / "ppo.pt", **{**run, "model": weights, "policy_prefix": "policy.",
                                            "lora": {**run["lora"], "prefixes": ["policy.", "critic."]}})
    main(["export", f"--ckpt={tmp_path / 'ppo.pt'}", f"--out={tmp_path / 'ppo'}", "--peft", "--dtype=bfloat16"])
    plain = safetensors_torch.load_file(adapter_dir / "adapter_model.safetensors")
    policy = safetensors_torch.load_file(tmp_path / "ppo" / "adapter_model.safetensors")
    assert set(policy) == set(plain) and all(policy[k].dtype == torch.bfloat16 for k in policy)
    assert all(torch.equal(policy[k], plain[k].to(torch.bfloat16)) for k in plain)
