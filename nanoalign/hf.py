"""Hugging Face format: load and save GPT-2 and Llama-family weights, and convert their tokenizers to tiktoken.

load_hf_model(dir) maps config.json onto GPTConfig and the weights onto model.py's module names; save_hf_model
writes them back (config.json + model.safetensors, sharded above a size) so that `transformers` or vLLM load
the aligned model. Families: GPT2LMHeadModel, LlamaForCausalLM (incl. Llama-3 rope scaling),
Qwen2ForCausalLM (q/k/v bias, tied or untied), MistralForCausalLM.

Decisions worth knowing:
- RoPE: model.py rotates split halves (rotate_half), exactly HF's layout, so q_proj/k_proj load unpermuted.
- GPT-2's Conv1D stores weights as (in, out): they are transposed, and c_attn is split into q, k, v.
- Weights keep the checkpoint's dtype (bf16 stays bf16) unless `dtype` is given; dropout is 0 (TRL's DPO
  default also disables dropout).
- Sliding-window attention (Mistral v0.1, Qwen2 with use_sliding_window) is not implemented in model.py;
  block_size is capped at the window, so a longer sequence is an error instead of a silent difference.
- PAD is never EOS (see load_tokenizer). When the tokenizer fills the whole embedding (GPT-2), the new PAD
  id is one row beyond it: load_hf_model grows the embedding by one row (the mean of the others, so the
  PAD's probability starts <= 1/V by Jensen's inequality and greedy decoding never picks it) and
  save_hf_model drops that row again. Logits of the real vocabulary are unchanged.
Export a training checkpoint: `python -m nanoalign.hf export --ckpt=out/dpo --out=/path/to/hf_model`; a LoRA
run's adapters alone in PEFT's format (base loaded from hf:<dir>): add `--peft` (see peft_adapter).
"""
import argparse
import json
import shutil
import unicodedata
from pathlib import Path

import regex
import tiktoken
import torch

from nanoalign.model import GPT, GPTConfig, rope_inv_freq
from nanoalign.tokenizer import GPT2_PAT_STR, PAD_TOKEN, Tokenizer

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
SUPPORTED_TOKENIZERS = "byte-level BPE tokenizer.json (GPT-2, Llama-3, Qwen2, SmolLM)"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
MAX_SHARD_BYTES = 5_000_000_000  # transformers' classic default shard size, "5GB"


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as err:
        raise ImportError("reading and writing HF models needs safetensors: pip install nanoalign[hf]") from err
    return safetensors.torch


# ----------------------------------------------------------------------------- config.json <-> GPTConfig

def read_hf_config(model_dir):
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory: it has no config.json")
    return json.loads(path.read_text())


def architecture(hf):
    arch = (hf.get("architectures") or ["<none>"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED)}")
    return arch


def _rope(hf):
    """(theta, llama3 scaling dict | None) from legacy rope_theta/rope_scaling or transformers 5's rope_parameters."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"rope type {kind!r} is not supported; supported: default, llama3")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {k: params[k] for k in keys}


def gpt_config_from_hf(hf):
    """GPTConfig for a supported config.json; raises on settings model.py cannot reproduce exactly."""
    arch = architecture(hf)
    if arch == "GPT2LMHeadModel":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):  # model.py has the tanh approximation only
            raise ValueError(f"GPT-2 activation {act!r} is not supported; supported: gelu_new")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise ValueError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
                         n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"],
                         mlp_hidden=hf.get("n_inner") or 0, norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported; supported: silu")
    attn_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
    if attn_bias != mlp_bias:  # model.py's `bias` switch covers attention and MLP together
        raise ValueError("attention_bias and mlp_bias must be equal for model.py's single `bias` switch")
    block_size = hf.get("max_position_embeddings", 2048)
    uses_window = hf.get("use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and hf.get("sliding_window"):  # full attention equals windowed attention up to the window
        block_size = min(block_size, hf["sliding_window"])
    theta, scaling = _rope(hf)
    return GPTConfig(vocab_size=hf["vocab_size"], block_size=block_size, n_layer=hf["num_hidden_layers"],
                     n_head=hf["num_attention_heads"], n_kv_head=hf.get("num_key_value_heads") or 0,
                     n_embd=hf["hidden_size"], head_dim=hf.get("head_dim") or 0, mlp_hidden=hf["intermediate_size"],
                     pos="rope", norm="rmsnorm", mlp="swiglu", bias=attn_bias,
                     qkv_bias=arch == "Qwen2ForCausalLM",  # Qwen2: bias on q, k, v only
                     tie_embeddings=hf.get("tie_word_embeddings", False), norm_eps=hf.get("rms_norm_eps", 1e-6),
                     rope_theta=theta, rope_scaling=scaling)


def _export_architecture(cfg, base):
    base_arch = (base or {}).get("architectures", [None])[0]
    if cfg.pos == "learned":
        if (cfg.norm, cfg.mlp, cfg.bias, cfg.n_kv_head, cfg.head_dim * cfg.n_head) != \
                ("layernorm", "gelu", True, cfg.n_head, cfg.n_embd):
            raise ValueError("learned positions export as GPT-2, which needs layernorm, gelu, bias, no GQA")
        return "GPT2LMHeadModel"
    if (cfg.norm, cfg.mlp) != ("rmsnorm", "swiglu"):
        raise ValueError("RoPE models export as Llama/Qwen2/Mistral, which need rmsnorm and swiglu")
    if cfg.qkv_bias and not cfg.bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if base_arch == "MistralForCausalLM" and not cfg.bias else "LlamaForCausalLM"


def hf_config_from_gpt(cfg, vocab_size, dtype, base=None):
    """config.json for `cfg`. Keys of `base` (the source config.json) that nanoalign does not model (token ids,
    sliding window, ...) are kept. RoPE is written as the legacy rope_theta/rope_scaling keys that
    transformers 4 and vLLM read; transformers 5 maps them to rope_parameters itself."""
    arch = _export_architecture(cfg, base)
    if arch == "GPT2LMHeadModel":
        fields = dict(model_type="gpt2", n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, n_inner=cfg.mlp_hidden, activation_function="gelu_new",
                      layer_norm_epsilon=cfg.norm_eps)
    else:
        fields = dict(model_type={"Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}.get(arch, "llama"),
                      hidden_size=cfg.n_embd, intermediate_size=cfg.mlp_hidden, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                      max_position_embeddings=max(cfg.block_size, (base or {}).get("max_position_embeddings", 0)),
                      rms_norm_eps=cfg.norm_eps, hidden_act="silu", rope_theta=cfg.rope_theta,
                      rope_scaling={"rope_type": "llama3", **cfg.rope_scaling} if cfg.rope_scaling else None)
        if arch == "LlamaForCausalLM":
            fields.update(attention_bias=cfg.bias, mlp_bias=cfg.bias)
    kept = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "dtype", "transformers_version")}
    return {**kept, "architectures": [arch], **fields, "vocab_size": vocab_size,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(dtype).removeprefix("torch.")}


# ----------------------------------------------------------------------------- weight names

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


# ----------------------------------------------------------------------------- weight files

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
        if f.suffix == ".safetensors":
            state.update(_safetensors().load_file(f))
        else:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
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


# ----------------------------------------------------------------------------- load / save models

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


def save_hf_model(model, out_dir, tokenizer_dir=None, max_shard_bytes=MAX_SHARD_BYTES):
    """Write config.json + safetensors for `model` in its current dtype. `tokenizer_dir` is the HF directory the
    model came from: its tokenizer files (and generation_config.json, chat template) are copied, its config.json
    supplies the architecture name, token ids and vocabulary size (a PAD row nanoalign added is dropped)."""
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
    write_safetensors(to_hf(state, cfg, cfg.pos == "learned", vocab_size), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    if tokenizer_dir and Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out


# ----------------------------------------------------------------------------- tokenizer.json -> tiktoken

def bytes_to_unicode():
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in ("Ġ" = space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class HFTokenizer(Tokenizer):
    """A Tokenizer plus what one tiktoken regex cannot express in HF byte-level tokenizers: NFC normalisation
    (Qwen2), digits split one by one before the regex (SmolLM), and non-special added tokens, which HF
    matches in ordinary text. Special tokens in text are still encoded as bytes (see Tokenizer.encode)."""

    def __init__(self, encoding, spec, eos_token, pad_token, bos_token=None, nfc=False, split_digits=False,
                 text_tokens=()):
        super().__init__(encoding, spec, eos_token, pad_token, bos_token)
        self.nfc = nfc
        self.text_token_ids = {t: encoding.encode_single_token(t) for t in text_tokens}
        pieces = [regex.escape(t) for t in sorted(text_tokens, key=len, reverse=True)] + [r"\p{N}"] * split_digits
        self.splitter = regex.compile("(" + "|".join(pieces) + ")") if pieces else None

    def encode(self, text: str) -> list[int]:
        if self.nfc:
            text = unicodedata.normalize("NFC", text)
        if self.splitter is None:
            return self.encoding.encode_ordinary(text)
        ids = []
        for chunk in self.splitter.split(text):  # text between separators, then a captured separator, ...
            if chunk in self.text_token_ids:
                ids.append(self.text_token_ids[chunk])
            elif chunk:
                ids.extend(self.encoding.encode_ordinary(chunk))
        return ids


def _pre_tokenizer(tj, where):
    """(regex, split_digits) for the byte-level layouts in use: GPT-2's ByteLevel regex, Llama-3/Qwen2's Split
    regex + ByteLevel, SmolLM's Digits + ByteLevel. Anything else cannot be one tiktoken regex."""
    model, pt = tj["model"], tj.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    kinds = [s.get("type") for s in steps]
    if model.get("type") != "BPE" or model.get("byte_fallback") or "Metaspace" in kinds:
        raise ValueError(f"{where}: a SentencePiece-style tokenizer ({model.get('type')}, {kinds}; e.g. Llama-2, "
                         f"Mistral, TinyLlama) cannot be expressed in tiktoken; supported: {SUPPORTED_TOKENIZERS}")
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" and not steps[-1].get("add_prefix_space") else None
    if byte_level and kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return GPT2_PAT_STR, False
    if byte_level and kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) \
            and steps[0]["behavior"] == "Isolated" and not steps[0]["invert"] and "Regex" in steps[0]["pattern"]:
        return steps[0]["pattern"]["Regex"], False
    if byte_level and kinds == ["Digits", "ByteLevel"] and steps[0]["individual_digits"] and \
            byte_level.get("use_regex", True):
        return GPT2_PAT_STR, True
    raise ValueError(f"{where}: pre-tokenizer {kinds} cannot be expressed in tiktoken; supported: "
                     f"{SUPPORTED_TOKENIZERS}")


def _content(token):
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def _ids(value):
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _prepended_token(post):
    """The special token a TemplateProcessing post-processor puts first (Llama-3's <|begin_of_text|>), if any."""
    for p in post.get("processors", [post]):
        single = p.get("single", []) if p.get("type") == "TemplateProcessing" else []
        if single and "SpecialToken" in single[0]:
            return single[0]["SpecialToken"]["id"]
    return None


def _mergeable_ranks(tj, added, where):
    """tiktoken ranks = HF ids of the byte-level vocabulary (added tokens excluded: they become special tokens).
    tiktoken merges the adjacent pair whose result has the lowest rank, HF the pair listed first in `merges`:
    the two agree when merge results come in increasing id order, which is checked here."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab, ranks = tj["model"]["vocab"], {}
    for token, i in vocab.items():
        if token not in added:
            if any(c not in byte_of for c in token):
                raise ValueError(f"{where}: vocabulary entry {token!r} is not byte-level; "
                                 f"supported: {SUPPORTED_TOKENIZERS}")
            ranks[bytes(byte_of[c] for c in token)] = i
    if missing := [b for b in range(256) if bytes([b]) not in ranks]:
        raise ValueError(f"{where}: the vocabulary lacks single bytes {missing[:8]}...; tiktoken needs all 256")
    last, seen = -1, set()
    for merge in tj["model"].get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge  # "a b" (older files) or ["a", "b"]
        i = vocab[a + b]
        if i not in seen and i < last:  # a repeated result (another split of the same bytes) keeps its rank
            raise ValueError(f"{where}: merge {a!r}+{b!r} creates id {i} after id {last}: ids do not follow the "
                             "merge order, so tiktoken ranks cannot express this tokenizer")
        seen.add(i)
        last = max(last, i)
    return ranks


def _choose_pad(added, tokenizer_config, not_pad):
    """A PAD that is no EOS, BOS or generation stop token (`not_pad`): tokenizer_config's pad_token, else a token
    reserved for padding or future use (Llama-3); None -> the caller adds a new <|pad|>."""
    candidates = [_content(tokenizer_config.get("pad_token")), "<|finetune_right_pad_id|>", PAD_TOKEN, "<pad>",
                  "[PAD]", *sorted((t for t in added if t.startswith("<|reserved_special_token_")), key=added.get)]
    return next((t for t in candidates if t in added and t not in not_pad), None)


def load_tokenizer(model_dir) -> Tokenizer:
    """tokenizer.json (byte-level BPE) as a tiktoken Encoding: ranks = HF ids, HF's pre-tokenizer regex, every
    added token as a special token. EOS is tokenizer_config.json's eos_token (else config.json's eos_token_id);
    BOS is set only when the HF tokenizer prepends it (its post-processor), so prepending bos_id reproduces
    HF's `tokenizer(text)`. PAD (see _choose_pad) is never an EOS or BOS; without one, a new <|pad|> follows the
    last id: inside the embedding when HF padded it (Qwen2's 151936 rows), else one row beyond it, which
    load_hf_model adds (GPT-2, SmolLM)."""
    d = Path(model_dir).resolve()
    if not (d / "tokenizer.json").exists():
        spm = " (its tokenizer.model is SentencePiece, which tiktoken cannot express)" \
            if (d / "tokenizer.model").exists() else ""
        raise FileNotFoundError(f"no tokenizer.json in {d}{spm}; supported: {SUPPORTED_TOKENIZERS}")
    tj = json.loads((d / "tokenizer.json").read_text())
    pat_str, split_digits = _pre_tokenizer(tj, d / "tokenizer.json")
    norm = (tj.get("normalizer") or {}).get("type")
    if norm not in (None, "NFC"):
        raise ValueError(f"{d}: normalizer {norm!r} is not supported; supported: none, NFC")
    added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    ranks = _mergeable_ranks(tj, added, d)
    tokenizer_config, config = _read_json(d / "tokenizer_config.json"), _read_json(d / "config.json")
    id_to_added = {i: t for t, i in added.items()}
    config_eos = _ids(config.get("eos_token_id"))
    eos = _content(tokenizer_config.get("eos_token")) or (id_to_added.get(config_eos[0]) if config_eos else None)
    if eos not in added:
        raise ValueError(f"{d}: EOS {eos!r} is not an added token of tokenizer.json")
    bos = _prepended_token(tj.get("post_processor") or {})
    stop_ids = config_eos + _ids(_read_json(d / "generation_config.json").get("eos_token_id"))
    pad = _choose_pad(added, tokenizer_config, {eos, bos} | {id_to_added.get(i) for i in stop_ids})
    specials = dict(added)
    if pad is None:
        pad, specials[PAD_TOKEN] = PAD_TOKEN, max([*ranks.values(), *added.values()]) + 1
    encoding = tiktoken.Encoding(name=f"hf:{d.name}", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    text_tokens = [t["content"] for t in tj.get("added_tokens", []) if not t.get("special")]
    return HFTokenizer(encoding, f"hf:{d}", eos_token=eos, pad_token=pad, bos_token=bos, nfc=norm == "NFC",
                       split_digits=split_digits, text_tokens=text_tokens)


# ----------------------------------------------------------------------------- LoRA adapters in PEFT's format

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
    from nanoalign.checkpoint import load_checkpoint
    config, tensors = peft_adapter(load_checkpoint(ckpt), dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _safetensors().save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- command line

def export_checkpoint(ckpt, out_dir, dtype=None, max_shard_bytes=MAX_SHARD_BYTES):
    """A nanoalign checkpoint (ckpt.pt or its run directory) as an HF model directory."""
    from nanoalign.checkpoint import load_model  # lazy: checkpoint imports this module lazily too
    model, tokenizer = load_model(str(ckpt))
    if dtype:
        model = model.to(_dtype(dtype))
    source = tokenizer.spec.removeprefix("hf:") if tokenizer.spec.startswith("hf:") else None
    return save_hf_model(model, out_dir, tokenizer_dir=source, max_shard_bytes=max_shard_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanoalign.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a nanoalign checkpoint as a Hugging Face model directory")
    export.add_argument("--ckpt", required=True, help="run directory or ckpt.pt")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's dtype)")
    export.add_argument("--max_shard_bytes", type=int, default=MAX_SHARD_BYTES)
    export.add_argument("--peft", action="store_true", help="a LoRA run's adapters only, in PEFT's format "
                        "(adapter_config.json + adapter_model.safetensors); its base must be an hf:<dir>")
    args = parser.parse_args(argv)
    out = export_peft(args.ckpt, args.out, args.dtype) if args.peft else \
        export_checkpoint(args.ckpt, args.out, args.dtype, args.max_shard_bytes)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
