"""config.json <-> GPTConfig for the supported Hugging Face families: GPT2LMHeadModel, LlamaForCausalLM (incl.
Llama-3 rope scaling), Qwen2ForCausalLM (q/k/v bias, tied or untied), MistralForCausalLM.

Settings model.py cannot reproduce exactly are errors, not approximations. Sliding-window attention (Mistral v0.1,
Qwen2 with use_sliding_window) is not implemented: block_size is capped at the window, so a longer sequence is an
error instead of a silent difference.
"""
import json
from pathlib import Path

from nanoalign.model import GPTConfig

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def read_hf_config(model_dir):
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory: it has no config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None


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
