"""tokenizer.json (byte-level BPE) -> a tiktoken Encoding with HF's ids, pre-tokenizer and special tokens."""
import json
import unicodedata
from pathlib import Path

import regex
import tiktoken

from nanoalign.tokenizer import GPT2_PAT_STR, PAD_TOKEN, Tokenizer

SUPPORTED_TOKENIZERS = "byte-level BPE tokenizer.json (GPT-2, Llama-3, Qwen2, SmolLM)"


def bytes_to_unicode():
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in ("Ġ" = space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


class HFTokenizer(Tokenizer):
    """A Tokenizer plus what one tiktoken regex cannot express in HF byte-level tokenizers: NFC normalisation
    (Qwen2), digits split one by one before the regex (SmolLM), and non-special added tokens, which HF
    matches in ordinary text. Special tokens in text are still encoded as bytes (see Tokenizer.encode); a chat
    template's text is split at `special_texts` (HF's special added tokens) by chat.py instead.
    `absent_bytes`: ids given to single bytes the vocabulary lacks (tiktoken needs a rank for all 256; see
    _mergeable_ranks). They are the last ids, outside vocab_size and the model's embedding, and encode drops them,
    as HF's BPE drops a byte it has no token for."""

    def __init__(self, encoding, spec, eos_token, pad_token, bos_token=None, nfc=False, split_digits=False,
                 text_tokens=(), absent_bytes=(), special_texts=()):
        super().__init__(encoding, spec, eos_token, pad_token, bos_token)
        self.nfc, self.absent_bytes = nfc, frozenset(absent_bytes)
        self.vocab_size = encoding.n_vocab - len(self.absent_bytes)  # the ids a model has rows for
        self.template_tokens = frozenset(special_texts)  # HF's special added tokens (not our own <|pad|>)
        self.text_token_ids = {t: encoding.encode_single_token(t) for t in text_tokens}
        pieces = [regex.escape(t) for t in sorted(text_tokens, key=len, reverse=True)] + [r"\p{N}"] * split_digits
        self.splitter = regex.compile("(" + "|".join(pieces) + ")") if pieces else None

    def normalize(self, text: str) -> str:
        return unicodedata.normalize("NFC", text) if self.nfc else text

    def encode(self, text: str) -> list[int]:
        ids = self._encode_all_bytes(self.normalize(text))
        return [i for i in ids if i not in self.absent_bytes] if self.absent_bytes else ids

    def encode_pieces(self, text: str) -> list[tuple[int | None, bytes]]:
        return [(None if i in self.absent_bytes else i, self.encoding.decode_single_token_bytes(i))
                for i in self._encode_all_bytes(self.normalize(text))]

    def _encode_all_bytes(self, text):
        """The ids of normalised text before absent bytes are dropped: their bytes concatenate to the text."""
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
    """(ranks, absent): tiktoken ranks = HF ids of the byte-level vocabulary (added tokens excluded: they become
    special tokens), and the single bytes the vocabulary lacks. tiktoken merges the adjacent pair whose result has
    the lowest rank, HF the pair listed first in `merges`: the two agree when merge results come in increasing id
    order, which is checked here. A real vocabulary may lack single bytes (SmolLM2's lacks 21, e.g. 0x04 and 0xC0,
    which UTF-8 never uses); HF then drops such a byte. No token contains one (checked), so the caller can rank them
    after every real id: they never merge with a neighbour, as in HF, and HFTokenizer.encode drops them."""
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    vocab, ranks = tj["model"]["vocab"], {}
    for token, i in vocab.items():
        if token not in added:
            if any(c not in byte_of for c in token):
                raise ValueError(f"{where}: vocabulary entry {token!r} is not byte-level; "
                                 f"supported: {SUPPORTED_TOKENIZERS}")
            ranks[bytes(byte_of[c] for c in token)] = i
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    if inside := [t for t in ranks if len(t) > 1 and any(b in absent for b in t)][:3]:
        raise ValueError(f"{where}: tokens {inside} contain bytes that have no token of their own; byte-level BPE "
                         f"builds every token from single-byte ones; supported: {SUPPORTED_TOKENIZERS}")
    last, seen = -1, set()
    for merge in tj["model"].get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge  # "a b" (older files) or ["a", "b"]
        i = vocab[a + b]
        if i not in seen and i < last:  # a repeated result (another split of the same bytes) keeps its rank
            raise ValueError(f"{where}: merge {a!r}+{b!r} creates id {i} after id {last}: ids do not follow the "
                             "merge order, so tiktoken ranks cannot express this tokenizer")
        seen.add(i)
        last = max(last, i)
    return ranks, absent


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
    ranks, absent = _mergeable_ranks(tj, added, d)
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
    first_absent = max([*ranks.values(), *specials.values()]) + 1  # after every id the model has a row for
    ranks.update({bytes([b]): first_absent + k for k, b in enumerate(absent)})
    encoding = tiktoken.Encoding(name=f"hf:{d.name}", pat_str=pat_str, mergeable_ranks=ranks, special_tokens=specials)
    text_tokens = [t["content"] for t in tj.get("added_tokens", []) if not t.get("special")]
    return HFTokenizer(encoding, f"hf:{d}", eos_token=eos, pad_token=pad, bos_token=bos, nfc=norm == "NFC",
                       split_digits=split_digits, text_tokens=text_tokens,
                       absent_bytes=range(first_absent, first_absent + len(absent)),
                       special_texts=[t["content"] for t in tj.get("added_tokens", []) if t.get("special")])


# ----------------------------------------------------------------------------- tiktoken -> tokenizer.json

def merges_from_ranks(ranks):
    """The BPE merges that rebuild a tiktoken vocabulary, in rank order: for each multi-byte token, the two parts
    tiktoken's own merging reaches when only lower ranks may be used (the pair that becomes the token)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:  # merge the adjacent pair with the lowest rank below this token's, as tiktoken does
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:])]
            i = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[i] >= rank:
                raise ValueError(f"token {token!r} (rank {rank}) is not reachable by merges of lower ranks")
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append(tuple(parts))
    return merges


def tokenizer_files(tokenizer):
    """(tokenizer.json, tokenizer_config.json) dicts for a tiktoken byte-level encoding (the toy, bytes and gpt2
    tokenizers), so that transformers' AutoTokenizer gives the same ids: a Split on the encoding's regex, then
    ByteLevel without its own regex, then BPE with the merges of merges_from_ranks; the special tokens as added
    tokens. HF tokenizers are copied from their source folder instead (save_hf_model)."""
    enc = tokenizer.encoding
    to_text = bytes_to_unicode()
    spell = lambda b: "".join(to_text[x] for x in b)  # noqa: E731  bytes -> the vocabulary's printable spelling
    ranks = enc._mergeable_ranks
    vocab = {spell(token): rank for token, rank in ranks.items()}
    specials = sorted(enc._special_tokens.items(), key=lambda item: item[1])
    tokenizer_json = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in specials],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [[spell(a), spell(b)] for a, b in merges_from_ranks(ranks)]}}
    id_to_special = {i: t for t, i in specials}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": id_to_special[tokenizer.eos_id],
              "split_special_tokens": True,  # special-token text in data stays text, as Tokenizer.encode keeps it
              "pad_token": id_to_special[tokenizer.pad_id], "clean_up_tokenization_spaces": False,
              "model_max_length": 1_000_000_000}
    if tokenizer.bos_id is not None:
        config["bos_token"] = id_to_special[tokenizer.bos_id]
    return tokenizer_json, config
