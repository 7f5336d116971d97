"""Hugging Face weight files: load and save GPT-2 and Llama-family weights under model.py's module names.

load_hf_model(dir) maps config.json onto GPTConfig (hf/config.py) and the weights onto our names; save_hf_model
writes them back (config.json + model.safetensors, sharded above a size) so that `transformers` or vLLM load
the aligned model.

Decisions worth knowing:
- RoPE: model.py rotates split halves (rotate_half), exactly HF's layout, so q_proj/k_proj load unpermuted.
- GPT-2's Conv1D stores weights as (in, out): they are transposed, and c_attn is split into q, k, v.
- Weights keep the checkpoint's dtype (bf16 stays bf16) unless `dtype` is given; dropout is 0 (TRL's DPO
  default also disables dropout).
- PAD is never EOS (see hf/tokenizer.py). When the tokenizer fills the whole embedding (GPT-2), the new PAD
  id is one row beyond it: load_hf_model grows the embedding by one row (the mean of the others, so the
  PAD's probability starts <= 1/V by Jensen's inequality and greedy decoding never picks it) and
  save_hf_model drops that row again. Logits of the real vocabulary are unchanged.
"""
import json
import shutil
from pathlib import Path

import regex
import torch

from nanoalign.hf.config import architecture, gpt_config_from_hf, hf_config_from_gpt, read_hf_config
from nanoalign.hf.tokenizer import load_tokenizer, tokenizer_files
from nanoalign.model import GPT, rope_inv_freq

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
MAX_SHARD_BYTES = 5_000_000_000  # transformers' classic default shard size, "5GB"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("reading and writing HF models needs safetensors: pip install nanoalign[hf]") from err
    return safetensors.torch


_LLAMA_NAMES = [(r"^tok_emb\.", "model.embed_tokens."), (r"^norm_f\.", "model.norm."),
                (r"^blocks\.(\d+)\.norm1\.", r"model.layers.\1.input_layernorm."),
                (r"^blocks\.(\d+)\.norm2\.", r"model.layers.\1.post_attention_layernorm."),
                (r"^blocks\.(\d+)\.attn\.", r"model.layers.\1.self_attn."),
                (r"^blocks\.(\d+)\.mlp\.", r"model.layers.\1.mlp.")]
_GPT2_NAMES = [(r"^tok_emb\.", "transformer.wte."), (r"^pos_emb\.", "transformer.wpe."),
               (r"^norm_f\.", "transformer.ln_f."), (r"^blocks\.(\d+)\.norm1\.", r"transformer.h.\1.ln_1."),
               (r"^blocks\.(\d+)\.norm2\.", r"transformer.h.\1.ln_2."),
               (r"^blocks\.(\d+)\.attn\.[qkv]_proj\.", r"transformer.h.\1.attn.c_attn."),
               (r"^blocks\.(\d+)\.attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
               (r"^blocks\.(\d+)\.mlp\.up_proj\.", r"transformer.h.\1.mlp.c_fc."),
               (r"^blocks\.(\d+)\.mlp\.down_proj\.", r"transformer.h.\1.mlp.c_proj.")]
_IGNORED = regex.compile(r"\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$")  # buffers some checkpoints carry


def hf_key(name, gpt2):
    """(HF name, transposed?, part of c_attn) for one of our parameter names."""
    for pattern, repl in _GPT2_NAMES if gpt2 else _LLAMA_NAMES:
        hf, n = regex.subn(pattern, repl, name)
        if n:
            break
    part = "qkv".index(name.split(".")[3][0]) if gpt2 and ".attn.c_attn." in hf else None
    conv1d = gpt2 and regex.search(r"\.(attn|mlp)\.\w+\.weight$", name) is not None  # GPT-2 Conv1D: (in, out)
    return hf, conv1d, part


def to_nanoalign(hf_state, model, gpt2, where):
    """Our state dict from HF tensors, checked name by name and shape by shape against `model` (on meta)."""
    if gpt2:  # GPT2Model checkpoints (e.g. the original `gpt2`) have no "transformer." prefix
        hf_state = {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v
                    for k, v in hf_state.items()}
    hf_state = {k: v for k, v in hf_state.items() if not _IGNORED.search(k)}
    tied = model.cfg.tie_embeddings
    out, used, missing = {}, {"lm_head.weight"} if tied else set(), []
    for name, param in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        hf, transposed, part = hf_key(name, gpt2)
        if hf not in hf_state:
            missing.append(hf)
            continue
        used.add(hf)
        t = hf_state[hf].t() if transposed else hf_state[hf]
        t = t.chunk(3, dim=0)[part] if part is not None else t  # c_attn rows: [q; k; v]
        if t.shape != param.shape:
            third = " (as q/k/v thirds)" if part is not None else ""
            raise ValueError(f"{where}: shape mismatch for {hf}: checkpoint has {tuple(hf_state[hf].shape)}, "
                             f"config.json implies {tuple(param.shape)}{third}")
        out[name] = t.contiguous()
    unexpected = sorted(set(hf_state) - used)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match config.json; missing: {missing or 'none'}; "
                         f"unexpected: {unexpected or 'none'}")
    if tied:
        out["lm_head.weight"] = out["tok_emb.weight"]
    return out


def to_hf(state, cfg, gpt2, vocab_size):
    """HF tensors from our state dict; rows beyond `vocab_size` (a PAD row added on load) are dropped."""
    groups = {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # HF ties lm_head to the embedding itself; safetensors refuses shared tensors
        if name in ("tok_emb.weight", "lm_head.weight"):
            t = t[:vocab_size]
        hf, transposed, part = hf_key(name, gpt2)
        groups.setdefault(hf, [transposed, {}])[1][part] = t
    out = {}
    for hf, (transposed, parts) in groups.items():
        t = torch.cat([parts[p] for p in sorted(parts, key=lambda p: -1 if p is None else p)], dim=0)  # [q; k; v]
        out[hf] = (t.t() if transposed else t).contiguous().cpu()
    return out


def read_weights(model_dir):
    """All tensors of model.safetensors, a sharded safetensors index, or pytorch_model.bin (weights_only)."""
    d = Path(model_dir)
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        files = [d / single] if (d / single).exists() else []
        if not files and (d / index_name).exists():
            files = [d / f for f in sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))]
        if files:
            break
    else:
        raise FileNotFoundError(f"no weights in {d}: looked for model.safetensors, model.safetensors.index.json, "
                                "pytorch_model.bin and pytorch_model.bin.index.json")
    state = {}
    for f in files:
        load = _safetensors().load_file if f.suffix == ".safetensors" else \
            (lambda path: torch.load(path, map_location="cpu", weights_only=True))
        try:
            state.update(load(f))
        except Exception as err:  # truncated, corrupt, not a weights file (SafetensorError, UnpicklingError, ...)
            raise ValueError(f"{f}: cannot read the weights ({type(err).__name__}: {err})") from None
    return state


def write_safetensors(hf_state, out_dir, max_shard_bytes=MAX_SHARD_BYTES):
    """model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json above the size."""
    st, out = _safetensors(), Path(out_dir)
    for stale in [*out.glob("model*.safetensors"), *out.glob("model.safetensors.index.json")]:
        stale.unlink()  # a stale single file would shadow a new index (and vice versa) when transformers loads
    shards, size = [{}], 0
    for name, t in hf_state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = t, size + nbytes
    if len(shards) == 1:
        return st.save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    weight_map = {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        st.save_file(shard, out / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, fname))
    total = sum(t.numel() * t.element_size() for t in hf_state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _dtype(dtype):
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def load_hf_model(path, device="cpu", dtype=None):
    """(GPT, Tokenizer) from a local HF model directory; weights in `dtype`, else the checkpoint's own dtype."""
    hf = read_hf_config(path)
    cfg = gpt_config_from_hf(hf)
    tokenizer = load_tokenizer(path)
    grow = tokenizer.pad_id == cfg.vocab_size  # PAD was added right after a full vocabulary
    if tokenizer.vocab_size > cfg.vocab_size + grow:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens, the model {cfg.vocab_size} rows")
    with torch.device("meta"):  # no memory and no random init for weights that are overwritten anyway
        model = GPT(cfg)
    state = to_nanoalign(read_weights(path), model, architecture(hf) == "GPT2LMHeadModel", str(path))
    dtype = _dtype(dtype) or state["tok_emb.weight"].dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    if grow:  # one more row, the mean of the others (see the module docstring)
        cfg.vocab_size += 1
        for name in ("tok_emb.weight", "lm_head.weight"):
            mean_row = state[name].float().mean(0, keepdim=True).to(dtype)          # (1, C), averaged in fp32
            state[name] = torch.cat([state[name], mean_row])                        # (V+1, C)
        if cfg.tie_embeddings:
            state["lm_head.weight"] = state["tok_emb.weight"]
        with torch.device("meta"):
            model = GPT(cfg)
    model.load_state_dict(state, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # assign=True made two Parameters of the one tensor
    if cfg.pos == "rope":
        model.inv_freq = rope_inv_freq(cfg).float()  # the non-persistent buffer was built on meta; fp32 as HF
    return model.to(device), tokenizer


def save_hf_model(model, out_dir, tokenizer_dir=None, max_shard_bytes=MAX_SHARD_BYTES, tokenizer=None):
    """Write config.json + safetensors for `model` in its current dtype. `tokenizer_dir` is the HF directory the
    model came from: its tokenizer files (and generation_config.json, chat template) are copied, its config.json
    supplies the architecture name, token ids and vocabulary size (a PAD row nanoalign added is dropped). Without
    one, a nanoalign `tokenizer` (toy, bytes, gpt2) is written as tokenizer.json + tokenizer_config.json
    (hf/tokenizer.py tokenizer_files) and its EOS / PAD / BOS ids go into config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    base = read_hf_config(tokenizer_dir) if tokenizer_dir and (Path(tokenizer_dir) / "config.json").exists() else None
    vocab_size = base["vocab_size"] if base else cfg.vocab_size
    if vocab_size > cfg.vocab_size:
        raise ValueError(f"the model has {cfg.vocab_size} rows but {tokenizer_dir}/config.json says {vocab_size}")
    state = model.state_dict()
    dtype = state["tok_emb.weight"].dtype
    hf_config = hf_config_from_gpt(cfg, vocab_size, dtype, base)
    if base is None and tokenizer is not None:
        hf_config.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id)
        for name, content in zip(("tokenizer.json", "tokenizer_config.json"), tokenizer_files(tokenizer)):
            (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=1) + "\n")
    write_safetensors(to_hf(state, cfg, cfg.pos == "learned", vocab_size), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir and Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out
