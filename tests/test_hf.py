"""nanoalign.hf and nanoalign.chat against `transformers` / `tokenizers`: tiny random models and a small BPE are
built here (nothing downloaded). minGPT's import test, for every family: logits allclose AND identical greedy
generations; plus round trips, weight file layouts, tokenizer conversion, chat rendering and bad inputs."""
import json
import shutil
import sys
from dataclasses import asdict

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from nanoalign.chat import chat_template_for, render_messages  # noqa: E402
from nanoalign.checkpoint import save_checkpoint  # noqa: E402
from nanoalign.hf import load_hf_model, load_tokenizer, main, read_weights, save_hf_model  # noqa: E402

transformers.logging.set_verbosity_error()
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
CORPUS = ["The quick brown fox jumps over the lazy dog 1234 times, don't we'll they're.",
          "café naïve 日本語 😀 ∑x² Ω", "hello   world\n\n tabs\tand\r\n lines", "3.14159 and 2718 and 42"] * 30
TEXTS = ["", "hello world", "The cat sat on the mat.", "  leading and trailing spaces   ", "tabs\tand\nnew\n\nlines\r\n",
         "digits 0 12 345 6789 and 3.14159", "unicode: café naïve 日本語 😀 ∑x² Ω ①", "punctuation!?;:'\"()[]{}<>",
         "don't WE'LL they're I'm it's", "decomposed cafe\u0301 e\u0301", "literal <|endoftext|> <|im_end|> <tool> text",
         "x" * 40 + " " * 7 + "\n" * 3]
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|start_header_id|>",
          "<|end_header_id|>", "<|eot_id|>"]


def train_tokenizer(layout):
    """A byte-level BPE laid out like GPT-2 ("gpt2"), Llama-3 ("llama3": Split regex, BOS template), Qwen2
    ("qwen2": Split regex, NFC) or SmolLM ("smollm": digits split first)."""
    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=layout in ("gpt2", "smollm"))
    split = {"llama3": LLAMA3_REGEX, "qwen2": QWEN2_REGEX}.get(layout)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), "isolated"), byte_level]) if split
                         else pre_tokenizers.Sequence([pre_tokenizers.Digits(True), byte_level]) if layout == "smollm"
                         else byte_level)
    if layout in ("llama3", "qwen2"):
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    specials = LLAMA3 if layout == "llama3" else CHATML if layout in ("qwen2", "smollm") else ["<|endoftext|>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if layout == "llama3":
        bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
    if layout == "qwen2":
        tok.add_tokens(["<tool>"])  # a non-special added token: HF matches it in ordinary text
    return tok


TOKENIZERS = {"gpt2": dict(eos_token="<|endoftext|>"),
              "llama3": dict(eos_token="<|eot_id|>", bos_token="<|begin_of_text|>",
                             chat_template="{{ bos_token }}<|start_header_id|>..."),
              "qwen2": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template="<|im_start|>..."),
              "smollm": dict(eos_token="<|im_end|>", pad_token="<|im_end|>")}


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Each layout saved by transformers as a real model directory would hold it (tokenizer_config.json, ...)."""
    dirs = {}
    for layout, kwargs in TOKENIZERS.items():
        dirs[layout] = tmp_path_factory.mktemp(f"tok_{layout}")
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(layout), **kwargs)
        fast.save_pretrained(dirs[layout])
    return dirs


# (transformers config class, its kwargs, tokenizer layout, extra model rows beyond the tokenizer)
FAMILIES = {
    "gpt2_tied": ("GPT2Config", dict(n_positions=64, n_embd=32, n_layer=2, n_head=4), "gpt2", 0),
    "llama_gqa_rope_scaling": ("LlamaConfig", dict(
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=32)), "llama3", 0),
    "qwen2_tied": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True), "qwen2", 7),
    "qwen2_untied": ("Qwen2Config", dict(num_key_value_heads=4, tie_word_embeddings=False), "qwen2", 7),
    "mistral_mqa_head_dim": ("MistralConfig", dict(num_key_value_heads=1, head_dim=16, sliding_window=24),
                             "smollm", 0),
}
LLAMA_SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=64)


def make_family(name, tokenizer_dirs, root):
    """A random HF model of family `name` saved with its tokenizer in root/name; returns (dir, model, V)."""
    config_class, kwargs, layout, extra_rows = FAMILIES[name]
    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dirs[layout] / "tokenizer.json"))
    eos = tok.token_to_id(TOKENIZERS[layout]["eos_token"])
    sizes = {} if config_class == "GPT2Config" else LLAMA_SIZES
    config = getattr(transformers, config_class)(**{**sizes, **kwargs}, vocab_size=tok.get_vocab_size() + extra_rows,
                                                 initializer_range=0.2, bos_token_id=eos, eos_token_id=eos)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model_dir = root / name
    model.save_pretrained(model_dir)
    for f in tokenizer_dirs[layout].iterdir():
        shutil.copy(f, model_dir)
    return model_dir, model, tok.get_vocab_size()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tokenizer_dirs, tmp_path_factory):
    model_dir, hf_model, n_tokens = make_family(request.param, tokenizer_dirs, tmp_path_factory.mktemp("models"))
    model, tok = load_hf_model(model_dir)
    return request.param, model_dir, hf_model, model.eval(), tok


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(ids).logits


def test_logits_match_transformers(family):
    name, _, hf_model, model, tok = family
    V = hf_model.config.vocab_size
    ids = torch.randint(0, tok.vocab_size - 1, (2, 20), generator=torch.Generator().manual_seed(1)) % V
    with torch.no_grad():
        ours = model(ids)
    assert ours.dtype == torch.float32 and model.cfg.vocab_size in (V, V + 1)
    assert (ours[..., :V] - hf_logits(hf_model, ids)).abs().max() <= 1e-4
    if name.startswith("llama"):
        assert model.cfg.rope_scaling["factor"] == 8.0 and model.cfg.n_kv_head == 2
    if name.startswith("mistral"):
        assert (model.cfg.head_dim, model.cfg.n_kv_head, model.cfg.block_size) == (16, 1, 24)  # capped at the window


def test_greedy_generation_matches_transformers(family):
    _, _, hf_model, model, tok = family
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    ours = model.generate(prompts, 10, temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    input_ids = torch.tensor([[5, 6, 7, 8, 9, 10], [0, 0, 0, 11, 12, 13]])   # left-padded as ours
    attention_mask = (torch.arange(6) >= torch.tensor([[0], [3]])).long()    # (2, 6)
    theirs = hf_model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=10, do_sample=False,
                               pad_token_id=0, eos_token_id=tok.eos_id)[:, 6:]
    for row_ours, row_theirs, keep in zip(ours.tokens.tolist(), theirs.tolist(), ours.mask.tolist()):
        n = int(sum(keep))  # tokens up to and including EOS; both pad differently after it
        assert row_ours[:n] == row_theirs[:n]


def test_round_trip_through_transformers(family, tmp_path):
    name, model_dir, hf_model, model, tok = family
    out = save_hf_model(model, tmp_path / "export", tokenizer_dir=model_dir)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded) is type(hf_model)
    assert reloaded.config.vocab_size == hf_model.config.vocab_size  # a PAD row added on load is dropped
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    assert (hf_logits(reloaded, ids) - hf_logits(hf_model, ids)).abs().max() <= 1e-5
    assert transformers.AutoTokenizer.from_pretrained(out)("hello world").input_ids  # tokenizer files copied
    again, tok2 = load_hf_model(out)
    assert again.cfg == model.cfg and tok2.pad_id == tok.pad_id


def test_pad_is_never_eos_and_fits_the_model(family):
    """gpt2: no pad and a full vocabulary -> a new id V and one grown row. llama3: no pad -> the reserved token.
    qwen2: tokenizer_config's pad <|endoftext|> is no EOS here -> used. smollm: pad == EOS -> new id V, grown."""
    name, model_dir, hf_model, model, tok = family
    assert tok.pad_id != tok.eos_id and tok.pad_id < model.cfg.vocab_size
    V = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json")).get_vocab_size()
    expected = {"gpt2_tied": V, "llama_gqa_rope_scaling": LLAMA3.index("<|reserved_special_token_0|>"),
                "qwen2_tied": 0, "qwen2_untied": 0, "mistral_mqa_head_dim": V}[name]  # 0: <|endoftext|>
    assert tok.pad_id == expected
    grown = model.cfg.vocab_size - hf_model.config.vocab_size
    assert grown == (1 if name in ("gpt2_tied", "mistral_mqa_head_dim") else 0)
    if grown:  # the new row is the mean row, so its logit is the mean logit: never the greedy choice
        assert torch.allclose(model.lm_head.weight[-1], model.lm_head.weight[:-1].mean(0))
