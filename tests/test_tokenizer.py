import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from nanoalign.tokenizer import (EOS_TOKEN, PAD_TOKEN, Tokenizer, _with_specials, get_tokenizer,
                                 pretokenize, train_bpe)

TEXTS = [
    "",
    "hello world",
    "The cat sat on the mat.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnew\n\nlines\r\n",
    "digits 0 12 345 6789 and 3.14159",
    "unicode: café naïve 日本語 😀 ∑x² Ω",
    "punctuation!?;:'\"()[]{}<>",
    "don't we'll they're I'm it's",
    "literal <|endoftext|> and <|pad|> text",
]

WORDS = {" the": 50, " cat": 10, " sat": 8, " on": 20, " mat": 5, " good": 7, " bad": 3, " café": 1}


@pytest.fixture(scope="module")
def small_bpe():
    return Tokenizer(_with_specials("small", train_bpe(WORDS, 1000)), "small")


@pytest.mark.parametrize("name", ["bytes", "small_bpe"])
def test_round_trip(name, small_bpe):
    tok = get_tokenizer("bytes") if name == "bytes" else small_bpe
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text


def test_bytes_spec():
    tok = get_tokenizer("bytes")
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id, tok.spec) == (258, 256, 257, None, "bytes")
    assert tok.encode("é") == [0xC3, 0xA9]  # UTF-8 bytes of U+00E9


def test_train_bpe_is_deterministic_and_makes_words_single_tokens():
    ranks = train_bpe(WORDS, 1000)
    assert ranks == train_bpe(dict(reversed(list(WORDS.items()))), 1000)  # dict order does not matter
    tok = Tokenizer(_with_specials("small", ranks), "small")
    for word in WORDS:
        assert len(tok.encode(word)) == 1, word
    # stopped early: far fewer than 1000 ranks, one per merge that was needed
    assert 256 < len(ranks) < 256 + sum(len(w.encode()) for w in WORDS)


def test_train_bpe_first_merges_by_hand():
    """Words {" ab": 3, " ac": 2}: pair counts (" ","a")=5, ("a","b")=3, ("a","c")=2.
    Merge 1: " a" (count 5) -> rank 256. Then (" a","b")=3 and (" a","c")=2: merge 2 is " ab" -> 257.
    Then (" a","c")=2 alone: " ac" -> 258. Every word is one token: stop with 259 ranks.
    A tie {" x": 1, " y": 1} goes to the smaller pair by bytes: (" ","x") before (" ","y")."""
    ranks = train_bpe({" ab": 3, " ac": 2}, 1000)
    assert [t for t, r in sorted(ranks.items(), key=lambda kv: kv[1]) if r >= 256] == [b" a", b" ab", b" ac"]
    ranks = train_bpe({" y": 1, " x": 1}, 1000)
    assert ranks[b" x"] == 256 and ranks[b" y"] == 257
    assert len(train_bpe({" ab": 3, " ac": 2}, 257)) == 257  # the cap counts the 256 byte ranks


def test_ranks_are_a_valid_tiktoken_encoding():
    ranks = train_bpe(WORDS, 1000)
    assert sorted(ranks.values()) == list(range(len(ranks)))  # dense ranks 0..n-1
    for token, rank in ranks.items():
        if rank >= 256:  # reachable: some split into two strictly lower-ranked tokens
            assert any(ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank
                       for i in range(1, len(token))), token
    enc = _with_specials("small", ranks)
    assert enc.n_vocab == len(ranks) + 2
    assert all(enc.decode_single_token_bytes(r) == t for t, r in ranks.items())


def test_specials_pad_is_not_eos_and_text_cannot_inject_them(small_bpe):
    for tok in (get_tokenizer("bytes"), small_bpe):
        assert tok.pad_id != tok.eos_id
        assert {tok.encoding.decode_single_token_bytes(i) for i in (tok.eos_id, tok.pad_id)} == {
            EOS_TOKEN.encode(), PAD_TOKEN.encode()}
        ids = tok.encode(EOS_TOKEN + PAD_TOKEN)
        assert tok.eos_id not in ids and tok.pad_id not in ids and len(ids) > 2
        assert tok.decode([tok.pad_id, 104, 105, tok.pad_id]) == "hi"  # PAD skipped
        assert tok.decode([tok.eos_id]) == EOS_TOKEN  # EOS is kept
        assert tok.decode([0xC3]) == "\ufffd"  # half a UTF-8 character
    with pytest.raises(ValueError, match="PAD must not be EOS"):
        Tokenizer(small_bpe.encoding, "bad", pad_token=EOS_TOKEN)


def test_pretokenize_matches_gpt2_regex():
    assert pretokenize("I am good.  ok") == ["I", " am", " good", ".", " ", " ok"]
    assert "".join(pretokenize(TEXTS[6])) == TEXTS[6]


def test_gpt2_without_cache_raises_clear_error(tmp_path, monkeypatch):
    def no_network(url):
        raise ConnectionError(f"no network in tests: {url}")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty cache
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)  # hermetic even where internet exists
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # no encoding loaded earlier in this process
    from nanoalign import tokenizer
    tokenizer._gpt2_encoding.cache_clear()
    with pytest.raises(RuntimeError, match="TIKTOKEN_CACHE_DIR") as info:
        get_tokenizer("gpt2")
    assert "no internet" in str(info.value) and str(tmp_path) in str(info.value)
    assert isinstance(info.value.__cause__, ConnectionError)


def test_unknown_spec():
    with pytest.raises(ValueError, match="bytes, gpt2, toy, hf:<dir>"):
        get_tokenizer("gpt3")


def test_toy_spec():
    from nanoalign.toy.world import make_corpus, vocabulary
    tok = get_tokenizer("toy")
    assert tok.vocab_size <= 1024 and tok.pad_id != tok.eos_id and tok.spec == "toy"
    assert get_tokenizer("toy").encoding is tok.encoding  # trained once per process
    assert tok.encoding._mergeable_ranks == train_bpe({" " + w: c for w, c in vocabulary().items()}, 1022)
    for word in vocabulary():  # every word, with its leading space, is one token
        assert len(tok.encode(" " + word)) == 1, word
    for review in make_corpus(20, seed=1):  # so a review costs one token per space-separated word
        assert len(tok.encode(" " + review)) == len(review.split(" "))
        assert tok.decode(tok.encode(review)) == review
