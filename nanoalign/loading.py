"""The one place that turns a spec into a model: what does `init_from=X` build?

    load_tokenizer(spec)           "bytes" | "gpt2" | "toy" | "hf:<dir>"          -> Tokenizer
    load_model(spec)               "ckpt:<dir or file>" | "hf:<dir>" | a bare path -> (GPT, Tokenizer)
    load_reward_model(spec)        a checkpoint of --algo=rm                       -> (RewardModel, Tokenizer)
    build_policy(cfg, device)      cfg.init_from: "scratch" or any load_model spec, then LoRA if cfg.lora_rank

A checkpoint (checkpoint.py, the file format) holds a full state dict, or for a LoRA run only the adapters and
heads plus a pointer to the base weights; both load here, so no caller ever sees the difference. The trainer's side
of LoRA lives here too: `apply_lora` puts adapters on every GPT inside an algorithm's module, `trainable_state` /
`load_trainable_state` are the one save/resume path with or without LoRA, and `merged_state_dict` rebuilds full
weights. The adapter layers themselves are lora.py's. `python -m nanoalign.loading merge <lora run> <out dir>`
writes a LoRA run as a full checkpoint.
"""
import sys
from pathlib import Path

import torch

from nanoalign.checkpoint import checkpoint_path, load_checkpoint, policy_state, save_checkpoint
from nanoalign.hf.tokenizer import load_tokenizer as load_hf_tokenizer
from nanoalign.hf.weights import load_hf_model
from nanoalign.lora import inject_lora, is_lora_param, lora_layers, parse_targets
from nanoalign.model import GPT, GPTConfig, RewardModel, llama_config
from nanoalign.tokenizer import get_tokenizer


def load_tokenizer(spec):
    """A registered tokenizer spec (tokenizer.py) or "hf:<dir>" (a tokenizer.json, nanoalign/hf/tokenizer.py)."""
    return load_hf_tokenizer(spec[len("hf:"):]) if spec.startswith("hf:") else get_tokenizer(spec)


def model_state(ckpt):
    """The full `model` state dict of a checkpoint: as saved, or for a LoRA checkpoint rebuilt from its base."""
    return merged_state_dict(ckpt) if "lora" in ckpt else ckpt["model"]


def model_from_checkpoint(ckpt, device="cpu"):
    """(GPT, Tokenizer) of a loaded checkpoint's policy (an actor-critic run stores it under a prefix)."""
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(policy_state({**ckpt, "model": model_state(ckpt)}))
    return model.to(device), load_tokenizer(ckpt["tokenizer"])


def load_model(spec, device="cpu", dtype=None):
    """A language model and its tokenizer from "ckpt:<dir or file>", "hf:<dir>" or a bare checkpoint path."""
    if spec.startswith("hf:"):
        return load_hf_model(spec[3:], device=device, dtype=dtype)
    ckpt = load_checkpoint(spec, device)
    if ckpt.get("kind", "policy") == "reward":
        raise ValueError(f"{checkpoint_path(spec)} holds a reward model, not a language model")
    model, tokenizer = model_from_checkpoint(ckpt, device)
    return (model.to(dtype) if dtype else model), tokenizer


def load_reward_model(spec, device="cpu"):
    """(RewardModel in eval mode, tokenizer) from a checkpoint written by --algo=rm ("ckpt:<dir>" or a path)."""
    ckpt = load_checkpoint(spec, device)
    if ckpt.get("kind") != "reward":
        raise ValueError(f"{spec} holds a {ckpt.get('kind', 'policy')} model, not a reward model "
                         "(train one with --algo=rm)")
    readout = ckpt.get("config", {}).get("rm_readout", "eos")  # checkpoints older than the option read at EOS
    model = RewardModel(GPT(GPTConfig(**ckpt["model_config"])), readout)
    model.load_state_dict(model_state(ckpt))
    return model.to(device).eval(), load_tokenizer(ckpt["tokenizer"])


def build_policy(cfg, device):
    """The starting language model of a run: a fresh one (init_from="scratch", shaped by cfg's model keys), a
    nanoalign checkpoint or Hugging Face weights; with cfg.lora_rank, adapters on it (apply_lora)."""
    if cfg.init_from == "scratch":
        tokenizer = load_tokenizer(cfg.tokenizer)
        make = llama_config if cfg.arch == "llama" else GPTConfig
        shape = dict(vocab_size=tokenizer.vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer,
                     n_head=cfg.n_head, n_kv_head=cfg.n_kv_head, n_embd=cfg.n_embd, dropout=cfg.dropout)
        model = GPT(make(**shape)).to(device)
    elif not cfg.init_from:
        raise ValueError("init_from is empty: give scratch, ckpt:<dir> or hf:<dir> (train.py fills in the toy world's)")
    else:
        model, tokenizer = load_model(cfg.init_from, device)
        model.cfg.dropout = cfg.dropout
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = cfg.dropout
    apply_lora(model, cfg)
    return model, tokenizer


# --- LoRA in a training run: every algorithm gets it from the run config's lora_* keys ---

def gpt_modules(module):
    """{state-dict prefix ("" or "critic."): GPT} for every language model inside `module`."""
    return {(name + "." if name else ""): m for name, m in module.named_modules() if isinstance(m, GPT)}


def apply_lora(module, cfg):
    """With cfg.lora_rank > 0: adapters (lora_rank, lora_alpha, lora_dropout, lora_targets) on every GPT inside
    `module` that has none yet (the policy; a critic or reward trunk the algorithm built), then freeze each GPT's
    own weights. Parameters outside the GPTs (reward and value heads) keep training, as in PERL. Returns the names
    that got adapters; with lora_rank 0 it does nothing."""
    if not cfg.lora_rank:
        return []
    if cfg.init_from == "scratch":
        raise ValueError("LoRA adapts a pretrained model: give --init_from=ckpt:<dir> or hf:<dir>, not scratch")
    replaced = []
    for prefix, gpt in gpt_modules(module).items():
        if not lora_layers(gpt):
            names = inject_lora(gpt, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
            replaced += [prefix + n for n in names]
        for name, p in gpt.named_parameters():
            p.requires_grad_(is_lora_param(name))
    return replaced


def base_pointer(spec):
    """init_from with its path made absolute, so the checkpoint finds its base from any working directory."""
    kind, sep, path = spec.partition(":") if spec.startswith(("ckpt:", "hf:")) else ("ckpt", ":", spec)
    return f"{kind}{sep}{Path(path).resolve()}"


def checkpointed_keys(module):
    """What a LoRA checkpoint stores of `module`: the adapters and everything outside the frozen GPTs: the heads
    and buffers such as a reward model's normalisation statistics (reward_mean / reward_std)."""
    gpt_prefixes = tuple(gpt_modules(module))  # "" when module is a GPT: then every key is inside it
    return [k for k in module.state_dict() if is_lora_param(k) or not k.startswith(gpt_prefixes)]


def trainable_state(module, cfg, state=None):
    """The `model` (and for a LoRA run `lora`) entries of a run's checkpoint. Without LoRA: the full state dict.
    With LoRA: adapters, heads and buffers only, plus what it takes to rebuild the full model (a pointer to the
    base, the adapters' shape, where each GPT sits in `module`, and which GPTs started from a reward model).
    `state`: module's state dict when it was gathered elsewhere (FSDP: fsdp.full_state); default module.state_dict()."""
    state = module.state_dict() if state is None else state
    if not cfg.lora_rank:
        return {"model": state}
    gpts = gpt_modules(module)
    trunks = {prefix: base_pointer(gpt.reward_model_spec) for prefix, gpt in gpts.items()  # PPO's critic from an RM
              if getattr(gpt, "reward_model_spec", None)}
    info = dict(base=base_pointer(cfg.init_from), rank=cfg.lora_rank, alpha=cfg.lora_alpha,
                targets=parse_targets(cfg.lora_targets), prefixes=list(gpts), reward_trunks=trunks)
    return {"model": {k: state[k] for k in checkpointed_keys(module)}, "lora": info}


def load_trainable_state(module, ckpt):
    """Resume: put what trainable_state saved back into a module built the same way."""
    if "lora" not in ckpt:
        module.load_state_dict(ckpt["model"])
        return
    expected, given = set(checkpointed_keys(module)), set(ckpt["model"])
    if expected != given:
        raise KeyError(f"checkpoint entries differ from this run's adapters and heads: missing "
                       f"{sorted(expected - given)[:5]}, unexpected {sorted(given - expected)[:5]}")
    module.load_state_dict(ckpt["model"], strict=False)


def merged_state_dict(ckpt):
    """The full `model` state dict of a LoRA checkpoint: the starting weights at every GPT prefix (the base's, or
    for a GPT listed in reward_trunks that reward model's backbone), each adapted weight W + (alpha / r) B A, and
    the checkpoint's heads and buffers."""
    info, saved = ckpt["lora"], ckpt["model"]
    base = load_model(info["base"])[0].state_dict()
    trunks = info.get("reward_trunks", {})
    full = {}
    for prefix in info["prefixes"]:
        start = load_reward_model(trunks[prefix])[0].backbone.state_dict() if prefix in trunks else base
        full.update({prefix + k: v.clone() for k, v in start.items()})
    scale = info["alpha"] / info["rank"]
    for key in saved:
        if key.endswith(".lora_A.weight"):
            layer = key[:-len("lora_A.weight")]                                # "...q_proj."
            W = full[layer + "weight"]                                         # (out, in), on the CPU
            A, B = saved[key].float().cpu(), saved[layer + "lora_B.weight"].float().cpu()  # (r, in), (out, r)
            W += (scale * B @ A).to(W.dtype)
    full.update({k: v for k, v in saved.items() if not is_lora_param(k)})  # heads
    return full


def main(argv=None):
    """python -m nanoalign.loading merge <lora run dir or ckpt.pt> <out dir>: a full checkpoint, loadable without
    LoRA or the base (optimizer and RNG state are dropped: the result is for sampling, export or the next stage)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "merge":
        raise SystemExit(main.__doc__)
    ckpt = load_checkpoint(argv[1])
    if "lora" not in ckpt:
        raise SystemExit(f"{checkpoint_path(argv[1])} is not a LoRA checkpoint (no 'lora' entry)")
    full = {k: v for k, v in ckpt.items() if k not in ("lora", "optimizer", "rng")}
    full["model"], full["merged_from"] = merged_state_dict(ckpt), ckpt["lora"]
    out = Path(argv[2]) if argv[2].endswith(".pt") else Path(argv[2]) / "ckpt.pt"
    save_checkpoint(out, **full)
    print(f"merged {checkpoint_path(argv[1])} (base {ckpt['lora']['base']}) into {out}")
    return out


if __name__ == "__main__":
    main()
