"""Tokenizers: thin wrappers around `tiktoken.Encoding`, rebuilt from a short spec string.

Specs: "bytes" (the 256 bytes), "gpt2" (tiktoken's GPT-2 BPE; needs its files in TIKTOKEN_CACHE_DIR), and
any name registered with `register_encoding` ("toy": the toy world's BPE, registered by nanoalign.toy).
"hf:<dir>" (a tokenizer.json converted by nanoalign/hf/tokenizer.py) is resolved by nanoalign.loading,
the one place that turns a spec into a model or tokenizer. Every encoding has EOS and PAD as explicit
special tokens, and PAD is never EOS: a padded position must never be read as "the sequence ended".
"""
import functools
import os
from collections import Counter

import regex
import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str as GPT2_PAT_STR  # GPT-2's pre-tokenizer regex

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TOY_MAX_VOCAB = 1024  # toy encoding size cap, special tokens included


class Tokenizer:
    """A tiktoken encoding plus its EOS/PAD/(BOS) ids and the `spec` that rebuilds it."""

    def __init__(self, encoding: tiktoken.Encoding, spec: str, eos_token: str = EOS_TOKEN,
                 pad_token: str = PAD_TOKEN, bos_token: str | None = None):
        for token in (eos_token, pad_token) + ((bos_token,) if bos_token else ()):
            if token not in encoding.special_tokens_set:
                raise ValueError(f"{token!r} is not a special token of {encoding.name}")
        if pad_token == eos_token:
            raise ValueError("PAD must not be EOS: padding would read as end of sequence")
        self.encoding, self.spec, self.name = encoding, spec, encoding.name
        self.eos_id = encoding.encode_single_token(eos_token)
        self.pad_id = encoding.encode_single_token(pad_token)
        self.bos_id = encoding.encode_single_token(bos_token) if bos_token else None
        self.vocab_size = encoding.n_vocab  # includes the special tokens
        self.template_tokens = encoding.special_tokens_set  # what a chat template's text may insert as a token

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. Special-token text such as "<|endoftext|>" in the data is encoded as
        ordinary bytes, never as the special id: user data must not be able to inject an EOS (or PAD)
        that would cut a completion short or hide tokens from the loss mask."""
        return self.encoding.encode_ordinary(text)

    def normalize(self, text: str) -> str:
        """The text as encode() sees it (HF tokenizers may normalise it first; see nanoalign/hf/tokenizer.py)."""
        return text

    def encode_pieces(self, text: str) -> list[tuple[int | None, bytes]]:
        """encode(normalize(text)) as (id, bytes of the token) pairs whose bytes concatenate to the text's UTF-8,
        so a character offset maps to tokens (chat.py's loss masks); an id is None where encode drops the byte."""
        return [(i, self.encoding.decode_single_token_bytes(i)) for i in self.encode(text)]

    def decode(self, ids) -> str:
        """Text of `ids` (a list, array or 1-D tensor); PAD ids are skipped, and byte sequences that
        are not valid UTF-8 (e.g. a sample cut inside a character) become U+FFFD."""
        return self.encoding.decode([int(i) for i in ids if int(i) != self.pad_id], errors="replace")

    def __repr__(self) -> str:
        return (f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"pad_id={self.pad_id}, bos_id={self.bos_id})")


def train_bpe(word_counts: dict[str, int], vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
    Units", Alg. 1; byte-level as in GPT-2) on pre-tokenised pieces such as " good".

    Returns tiktoken `mergeable_ranks`: ranks 0..255 are the single bytes, then one rank per merge in
    the order learnt, so every merged token is the concatenation of two lower-ranked tokens.
    Each step merges the adjacent pair with the highest count (summed over words, weighted by the
    word's count); ties go to the smallest (left bytes, right bytes), so the result never depends on
    dict order. Departures from the paper: training stops when `vocab_size` ranks exist or when every
    word is a single token (so even pairs seen once are merged: the toy world wants each of its words
    to be one token); a merge whose bytes already exist (reached by another split, e.g. "ab"+"c" after
    "a"+"bc") is applied to the words but adds no second rank.
    """
    ranks = {bytes([b]): b for b in range(256)}
    words = {tuple(bytes([b]) for b in word.encode("utf-8")): count
             for word, count in word_counts.items() if count > 0}
    while len(ranks) < vocab_size:
        pair_counts = Counter()
        for parts, count in words.items():
            for pair in zip(parts, parts[1:]):
                pair_counts[pair] += count
        if not pair_counts:  # every word is one token
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))  # most frequent, then by bytes
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        words = {_merge(parts, best, merged): count for parts, count in words.items()}
    return ranks


def _merge(parts: tuple[bytes, ...], pair: tuple[bytes, bytes], merged: bytes) -> tuple[bytes, ...]:
    """`parts` with every non-overlapping occurrence of `pair`, left to right, replaced by `merged`."""
    out, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def pretokenize(text: str) -> list[str]:
    """The pieces GPT-2's regex splits `text` into, e.g. "I am good." -> ["I", " am", " good", "."]."""
    return regex.findall(GPT2_PAT_STR, text)


def _with_specials(name: str, mergeable_ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """An encoding with GPT-2's regex and EOS, PAD appended right after the mergeable ranks."""
    n = len(mergeable_ranks)
    return tiktoken.Encoding(name=name, pat_str=GPT2_PAT_STR, mergeable_ranks=mergeable_ranks,
                             special_tokens={EOS_TOKEN: n, PAD_TOKEN: n + 1})


def toy_encoding(vocabulary: dict[str, int]) -> tiktoken.Encoding:
    """Byte-level BPE trained on a word-count vocabulary (each word in its mid-sentence form, " word", as GPT-2's
    regex yields it), TOY_MAX_VOCAB ids in all, the last two for EOS and PAD."""
    pieces = Counter()
    for word, count in vocabulary.items():
        for piece in pretokenize(" " + word):
            pieces[piece] += count
    return _with_specials("toy", train_bpe(dict(pieces), TOY_MAX_VOCAB - 2))


@functools.lru_cache(maxsize=None)
def _gpt2_encoding() -> tiktoken.Encoding:
    try:
        base = tiktoken.get_encoding("gpt2")
    except Exception as err:  # no internet: requests' ConnectionError; also a bad or partial cache file
        raise RuntimeError(
            "could not load tiktoken's GPT-2 BPE files: tiktoken downloads them on first use and this "
            "machine has no internet. On a machine with internet run `TIKTOKEN_CACHE_DIR=<dir> python -c "
            "\"import tiktoken; tiktoken.get_encoding('gpt2')\"`, copy <dir> here and set TIKTOKEN_CACHE_DIR "
            f"to it (now {os.environ.get('TIKTOKEN_CACHE_DIR', '<unset>')!r})") from err
    # GPT-2 has no pad token: add one after <|endoftext|> (50256), the extension tiktoken documents
    return tiktoken.Encoding(name="gpt2", pat_str=base._pat_str, mergeable_ranks=base._mergeable_ranks,
                             special_tokens={**base._special_tokens, PAD_TOKEN: base.n_vocab})


ENCODINGS = {  # spec -> a zero-argument function building its encoding (called once, cached)
    "bytes": lambda: _with_specials("bytes", {bytes([b]): b for b in range(256)}),
    "gpt2": _gpt2_encoding,
}


def register_encoding(spec: str, build) -> None:
    """Make get_tokenizer(spec) return Tokenizer(build(), spec); `build` runs once, on first use."""
    ENCODINGS[spec] = functools.lru_cache(maxsize=None)(build)


def get_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by a registered spec ("bytes", "gpt2", "toy" once nanoalign.toy is imported)."""
    if spec.startswith("hf:"):
        raise ValueError(f"{spec!r} is a Hugging Face tokenizer: nanoalign.loading.load_tokenizer reads it")
    if spec not in ENCODINGS:
        hint = " (the toy world registers it: import nanoalign.toy)" if spec == "toy" else ""
        raise ValueError(f"unknown tokenizer spec {spec!r}{hint}; valid: {', '.join(ENCODINGS)}, hf:<dir>")
    return Tokenizer(ENCODINGS[spec](), spec)
