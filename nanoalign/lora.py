"""LoRA: low-rank adapters on chosen linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", Eq. 3): h = W0 x + B A x, with A (r, in) random, B (out, r) zero, so the model is unchanged at init.

    y = W x + b + (alpha / r) * B A dropout(x)        # the scale alpha / r is Sec. 4.1's

Only A and B train; the base weights, embeddings and norms stay frozen. With the adapters switched off the model
*is* the base model, so preference algorithms take their reference log-probs from the same weights
(`disable_lora`) instead of a second copy (as PERL, Sidahmed et al. 2024, and TRL with PEFT do).

Choices and departures:
- A is initialised as nn.Linear is (kaiming-uniform, a=sqrt(5)), as PEFT does; the paper only says "random
  Gaussian". B is zero as in the paper.
- A LoRALinear keeps the wrapped layer's own `weight` and `bias` Parameters under the same names, so the state-dict
  keys of the base model do not change: a base checkpoint loads into a LoRA model, and after `merge_and_unload`
  the model is a plain GPT again. Adapter keys end in `lora_A.weight` / `lora_B.weight`, as PEFT's do.
- `disable_lora` refuses a merged model (RuntimeError) rather than unmerging and re-merging: W + s BA - s BA is
  not bit-identical to W, and the reference model must be exactly the base.
- The tied output head of GPT-2 configs (lm_head.weight is tok_emb.weight) is never wrapped: merging into it would
  change the embedding too. `inject_lora` refuses any target whose weight is shared.

This file is the adapter layers only. A training run gets them from `--lora_rank=16 --lora_alpha=32
--lora_targets=q_proj,v_proj` (any algorithm); nanoalign/loading.py puts them on every GPT of the run, saves the
adapters and heads with a pointer to the base, and rebuilds full weights from such a checkpoint
(`python -m nanoalign.loading merge <run> <out>` writes one). Limits: the base must be a checkpoint (not `scratch`),
and every LM in the module must have started from it, except a GPT that carries a `reward_model_spec` attribute
(PPO's critic initialised from a reward model): its starting weights are that reward model's backbone, and the
checkpoint records where to find them (`reward_trunks`).
"""
import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LoRALinear(nn.Module):
    """y = x W^T + b + scale * dropout(x) A^T B^T, wrapping (not copying) an existing nn.Linear's weight and bias."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters: no copy, same state-dict keys
        kw = dict(bias=False, device=linear.weight.device, dtype=linear.weight.dtype)
        self.lora_A = nn.Linear(self.in_features, rank, **kw)   # A: (r, in), kaiming-uniform as nn.Linear's default
        self.lora_B = nn.Linear(rank, self.out_features, **kw)  # B: (out, r), zero -> B A = 0 at init
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.merged, self.disabled = False, False

    def delta_weight(self):
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def merge(self):
        """W <- W + scale * B A in place; forward then skips the adapter path."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W <- W - scale * B A: the base weights back, up to rounding."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)  # exactly nn.Linear's forward
        if self.merged or self.disabled:
            return y
        return y + self.scale * self.lora_B(self.lora_A(self.dropout(x)))

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, merged={self.merged}, disabled={self.disabled}")


def lora_layers(model):
    """Every LoRALinear in `model` (works through DDP and torch.compile wrappers)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def parse_targets(targets):
    """"q_proj,v_proj" or ["q_proj", "v_proj"] -> ["q_proj", "v_proj"]."""
    if isinstance(targets, str):
        targets = targets.split(",")
    return [t.strip() for t in targets if t.strip()]


def inject_lora(model, rank, alpha, dropout=0.0, targets=("q_proj", "v_proj")):
    """Replace every nn.Linear whose name ends with one of `targets` (e.g. "q_proj", "mlp.up_proj") by a LoRALinear.
    Returns the names replaced. Does not freeze anything: call mark_only_lora_trainable(model) for that."""
    targets = parse_targets(targets)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers: inject_lora was called twice")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    uses = {}  # how many modules own each Parameter: > 1 means tied (lm_head and tok_emb in GPT-2 configs)
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    for t in targets:
        if not any(name == t or name.endswith("." + t) for name in linears):
            suffixes = sorted({name.split(".")[-1] for name in linears})
            raise ValueError(f"LoRA target {t!r} matches no linear layer; linear layers are named {suffixes} "
                             f"(e.g. {next(iter(linears), '')!r})")
    replaced = []
    for name, linear in linears.items():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if uses[id(linear.weight)] > 1:
            raise ValueError(f"{name}.weight is tied to another parameter (tied embeddings); it cannot get LoRA")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(linear, rank, alpha, dropout))
        replaced.append(name)
    return replaced


def is_lora_param(name):
    return ".lora_A." in name or ".lora_B." in name or name.startswith(("lora_A.", "lora_B."))


def mark_only_lora_trainable(model, keep=()):
    """Freeze every parameter (embeddings and norms included) except the adapters and those whose names start with
    one of `keep` (e.g. a reward model's head)."""
    for name, p in model.named_parameters():
        p.requires_grad_(is_lora_param(name) or name.startswith(tuple(keep)))


def lora_state_dict(model):
    """Only the adapter weights: {"...q_proj.lora_A.weight": (r, in), "...q_proj.lora_B.weight": (out, r), ...}."""
    return {k: v for k, v in model.state_dict().items() if is_lora_param(k)}


def load_lora_state_dict(model, state_dict):
    """Load adapter weights saved by lora_state_dict; the keys must be exactly the model's adapter keys."""
    if any(m.merged for m in lora_layers(model)):
        raise RuntimeError("load_lora_state_dict into a merged model: unmerge_lora(model) first")
    expected, given = set(lora_state_dict(model)), set(state_dict)
    if expected != given:
        raise KeyError(f"adapter keys differ: missing {sorted(expected - given)[:5]}, "
                       f"unexpected {sorted(given - expected)[:5]} (same --lora_targets as the run that saved them?)")
    model.load_state_dict(state_dict, strict=False)


def merge_lora(model):
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model):
    for m in lora_layers(model):
        m.unmerge()


def merge_and_unload(model):
    """Merge every adapter into its weight and put plain nn.Linear layers back: `model` becomes a plain GPT whose
    state dict loads without LoRA. In place; returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight, linear.bias = module.weight, module.bias  # the merged Parameters themselves
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, linear)
    return model


@contextlib.contextmanager
def disable_lora(model):
    """Within the block the adapters are off and `model` computes exactly the base model (the reference policy).
    Refuses a merged model: unmerging would restore the base only up to rounding."""
    layers = lora_layers(model)
    if any(m.merged for m in layers):
        raise RuntimeError("disable_lora on a merged model: its weights include the adapters; unmerge_lora first")
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, before):
            m.disabled = flag


def count_parameters(model):
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
