"""LoRA adapters in PEFT's format (adapter_config.json + adapter_model.safetensors), so PEFT and vLLM load them."""
import json
from pathlib import Path

import torch

from nanoalign.checkpoint import load_checkpoint
from nanoalign.hf.config import architecture, read_hf_config
from nanoalign.hf.weights import _dtype, _safetensors, hf_key
from nanoalign.model import GPT, GPTConfig


def peft_adapter(ckpt, dtype=None):
    """(adapter_config.json dict, adapter_model.safetensors tensors) for a LoRA run whose base is an hf:<dir>, so
    PEFT (`PeftModel.from_pretrained(base, dir)`) and vLLM load it. Keys: the full weights' HF names (hf_key) under
    PEFT's "base_model.model." prefix; A (r, in) and B (out, r) are never transposed: PEFT's fan_in_fan_out
    (GPT-2's Conv1D) transposes the product B A only. The scale is alpha / r in both (use_rslora false).
    GPT-2's fused c_attn gets one adapter equal to the split ones: for targets q, v (k = 2 of them) A = [A_q; A_v]
    (k r, C) and B (3C, k r) holds B_q in rows 0:C, columns 0:r and B_v in rows 2C:3C, columns r:2r, zeros elsewhere,
    so B A = [B_q A_q; 0; B_v A_v]; rank k r with alpha k alpha (rank_pattern, alpha_pattern) keeps the scale."""
    info = ckpt.get("lora")
    if info is None:
        raise ValueError("not a LoRA checkpoint (no 'lora' entry): export the full model without --peft")
    if not info["base"].startswith("hf:"):
        raise ValueError(f"the adapters' base is {info['base']}, not an hf:<dir>: a PEFT adapter needs a Hugging Face "
                         "base model; export the merged model without --peft instead")
    if ckpt.get("kind", "policy") != "policy":
        raise ValueError(f"a {ckpt['kind']!r} checkpoint is not a causal LM: only policy adapters export to PEFT")
    base_dir, r, alpha = info["base"][3:], info["rank"], info["alpha"]
    hf = read_hf_config(base_dir)
    gpt2 = architecture(hf) == "GPT2LMHeadModel"
    prefix = ckpt.get("policy_prefix", "")
    saved = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    groups = {}  # HF module name -> {part of c_attn or None: (A, B)}
    for key in saved:
        if key.endswith(".lora_A.weight"):
            layer = key.removesuffix("lora_A.weight")                      # "blocks.0.attn.q_proj."
            module, _, part = hf_key(layer + "weight", gpt2)
            groups.setdefault(module.removesuffix(".weight"), {})[part] = (saved[key], saved[layer + "lora_B.weight"])
    tensors, ranks = {}, {}
    for module, parts in groups.items():
        if None in parts:  # one nanoalign layer -> one HF module
            A, B = parts[None]
        else:              # q/k/v adapters (parts 0/1/2) -> GPT-2's c_attn, as in the docstring
            A = torch.cat([parts[p][0] for p in sorted(parts)])                          # (k r, C)
            C = parts[min(parts)][1].shape[0]
            B = torch.zeros(3 * C, len(A), dtype=A.dtype)                                # (3C, k r)
            for j, p in enumerate(sorted(parts)):
                B[p * C:(p + 1) * C, j * r:(j + 1) * r] = parts[p][1]                    # B_p in block (p, j)
        B = B[:hf["vocab_size"]] if module == "lm_head" else B  # drop a PAD row nanoalign added
        ranks[module.rpartition(".")[2]] = len(A)
        for name, t in (("lora_A", A), ("lora_B", B)):
            tensors[f"base_model.model.{module}.{name}.weight"] = t.to(_dtype(dtype) or t.dtype).contiguous().cpu()
    with torch.device("meta"):
        model = GPT(GPTConfig(**ckpt["model_config"]))
    linears = {hf_key(n + ".weight", gpt2)[0].removesuffix(".weight") for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    targets = []  # a module's short name ("q_proj") where every module of that name has an adapter, else full names
    for leaf in sorted(ranks):
        named = {m for m in linears if m.rpartition(".")[2] == leaf}
        targets += [leaf] if named <= set(groups) else sorted(named & set(groups))
    fused = {leaf: k for leaf, k in ranks.items() if k != r}             # c_attn: rank k r
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", base_model_name_or_path=base_dir, r=r, lora_alpha=alpha,
                  lora_dropout=ckpt.get("config", {}).get("lora_dropout", 0.0), target_modules=targets, bias="none",
                  fan_in_fan_out=gpt2, use_rslora=False, use_dora=False, modules_to_save=None,
                  rank_pattern=fused, alpha_pattern={leaf: alpha * k / r for leaf, k in fused.items()},
                  inference_mode=True)
    return config, tensors


def export_peft(ckpt, out_dir, dtype=None):
    """adapter_config.json + adapter_model.safetensors for a LoRA run (run directory or ckpt.pt)."""
    config, tensors = peft_adapter(load_checkpoint(ckpt), dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
