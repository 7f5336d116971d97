"""Tests of the toy world (nanoalign/toy/world.py): corpus, gold reward, recogniser and simulated annotators."""
import json
import math
import random
from collections import defaultdict

import pytest

from nanoalign.toy.world import (SCALE, TAU, binary_feedback, bradley_terry_prob, gold_reward, is_grammatical,
                                 label_pairs, make_corpus, sentiment_score, split_prompt, vocabulary, write_jsonl)


def test_corpus_is_deterministic_in_the_seed():
    assert make_corpus(200, seed=0) == make_corpus(200, seed=0)
    assert make_corpus(200, seed=0) != make_corpus(200, seed=1)
    rewards = [gold_reward(text) for text in make_corpus(200, seed=0)]
    assert rewards == [gold_reward(text) for text in make_corpus(200, seed=0)]


def test_corpus_is_half_positive_and_gold_reward_is_calibrated():
    """Every review's gold score has the sign of its latent sentiment, so exactly half score above 0.5;
    SCALE makes typical (median) positive reviews score 0.8-0.95 and negative ones 0.05-0.2."""
    corpus = make_corpus(2000, seed=3)
    rewards = sorted(gold_reward(text) for text in corpus)
    assert sum(r > 0.5 for r in rewards) == 1000 and sum(r < 0.5 for r in rewards) == 1000
    assert 0.8 <= rewards[1500] <= 0.95 and 0.05 <= rewards[500] <= 0.2  # medians of each half
    assert sum(gold_reward(text) > 0.5 for text in make_corpus(7, seed=0)) == 3  # odd n: n // 2 positive


def test_corpus_texts_follow_the_conventions():
    for text in make_corpus(300, seed=4):
        words = text.split(" ")
        assert text == text.lower() and text.endswith(" .") and "" not in words
        assert 8 <= sum(w != "." for w in words) <= 30 and 1 <= words.count(".") <= 3


@pytest.mark.parametrize("text, expected", [
    ("the plot was good .", 1.0),
    ("the plot was not good .", -1.0),
    ("the plot was very good .", 1.5),
    ("the plot was not very good .", -1.5),
    ("the plot was extremely dull .", -2.0),
    ("the plot was quite good .", 0.7),
    ("the plot was very very good .", 2.25),
    ("the plot was not not good .", 1.0),
    ("the plot was not good and great .", 0.5),
    ("the plot was not . good", 1.0),
    ("i did not really enjoy it .", -1.5),
    ("it was not a masterpiece .", -2.5),
    ("i would not recommend it .", -1.5),
    ("the zorblax was purple .", 0.0),
    ("", 0.0),
    ("GOOD!!! 123 great\n", 2.5),
])
def test_sentiment_score_by_hand(text, expected):
    """Expected values by hand (weights: good 1.0, great 1.5, dull -1.0, enjoy 1.0, masterpiece 2.5,
    recommend 1.5; scales: very 1.5, really 1.5, extremely 2.0, quite 0.7):
    good = 1.0; not good = -1 * 1.0; very good = 1.5 * 1.0; not very good = -1 * 1.5 * 1.0 = -1.5;
    extremely dull = 2.0 * -1.0; quite good = 0.7 * 1.0; very very good = 1.5 * 1.5 * 1.0 = 2.25;
    not not good = (-1)(-1) * 1.0; "not good and great" = -1.0 + 1.5 = 0.5 (not flips only the NEXT word);
    "not . good" = +1.0 (a sentence end cancels the pending not); did not really enjoy = -1 * 1.5 * 1.0;
    not a masterpiece = -2.5 (not waits over "a"); would not recommend = -1.5; unknown words and "" = 0;
    "GOOD!!! 123 great" is lowercased and split into words and symbols: 1.0 + 1.5 = 2.5."""
    assert sentiment_score(text) == pytest.approx(expected)


def test_gold_reward_by_hand_and_reward_hacking():
    """gold("the plot was good .") = sigmoid(1.0 / 1.25) = 1 / (1 + e^-0.8) = 1 / 1.449329 = 0.689974;
    gold("") = sigmoid(0) = 0.5; "perfect" x4 scores 4 * 2.5 = 10, sigmoid(10 / 1.25) = sigmoid(8) = 0.999665:
    the reward is hacked to ~1 by ungrammatical text."""
    assert SCALE == 1.25
    assert gold_reward("the plot was good .") == pytest.approx(0.689974, abs=1e-6)
    assert gold_reward("the plot was not good .") == pytest.approx(1 - 0.689974, abs=1e-6)
    assert gold_reward("") == 0.5
    hacked = "perfect perfect perfect perfect"
    assert gold_reward(hacked) == pytest.approx(0.999665, abs=1e-6) and not is_grammatical(hacked)
    assert 0.0 <= gold_reward("not " * 500 + "perfect " * 500) <= 1.0  # no overflow on huge scores


def test_grammaticality():
    corpus = make_corpus(2000, seed=5)
    assert all(is_grammatical(text) for text in corpus)
    for text in corpus[:300]:
        words = text.split(" ")
        for end in range(1, len(words)):  # every truncation that does not end a sentence
            assert words[end - 1] == "." or not is_grammatical(" ".join(words[:end]))
        assert not is_grammatical(text.replace(" ", "  ", 1)) and not is_grammatical(text.upper())
    assert is_grammatical("the plot was not very good . i would recommend it to everyone .")
    assert is_grammatical("the plot was good . i would recommend it .")  # 8 words, the minimum
    assert is_grammatical(" ".join(["overall the action scenes were extremely gripping from start to finish ."] * 2))
    for bad in ["great great great great", "", ".", "the plot was good . i loved it .",  # 7 words
                "the acting was very . i would recommend it to everyone .",  # truncated adjective phrase
                "it was not a . i would recommend it to everyone .",  # truncated noun phrase
                "the characters was good . i would recommend it to everyone .",  # number agreement
                "it was a awful film . i would recommend it to everyone .",  # article agreement
                " ".join(["overall the action scenes were extremely gripping from start to finish ."] * 3)]:  # 33 words
        assert not is_grammatical(bad), bad


def test_split_prompt():
    rng, lengths = random.Random(0), set()
    for text in make_corpus(500, seed=6):
        prompt, completion = split_prompt(text, rng)
        assert prompt + completion == text and completion.startswith(" ") and len(completion.split()) >= 2
        lengths.add(len(prompt.split(" ")))
    assert lengths == set(range(2, 9))
    with pytest.raises(ValueError):
        split_prompt("too short .", rng)


def test_vocabulary_covers_the_grammar_and_is_deterministic():
    vocab = vocabulary()
    assert vocab == vocabulary() and list(vocab) == list(vocabulary())
    assert 150 <= len(vocab) <= 300 and "." in vocab and min(vocab.values()) >= 1
    assert list(vocab.values()) == sorted(vocab.values(), reverse=True)
    assert {w for text in make_corpus(2000, seed=7) for w in text.split(" ")} <= set(vocab)


def within_4_standard_errors(successes: int, n: int, p: float) -> bool:
    """Is the empirical rate successes / n within 4 standard errors sqrt(p(1-p)/n) of the probability p?"""
    return abs(successes / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_annotators_match_bradley_terry():
    """r_a = 0.70, r_b = 0.55, tau = 0.15: P(a > b) = sigmoid(0.15 / 0.15) = sigmoid(1) = 0.731059.
    With n = 20000 draws, one standard error is sqrt(0.731 * 0.269 / 20000) = 0.0031, so the test accepts
    rates within +-0.0125 of 0.731 and must reject 0.5 (73 SE away) and sigmoid(0.5) = 0.622 (tau doubled)."""
    assert bradley_terry_prob(0.70, 0.55, 0.15) == pytest.approx(0.731059, abs=1e-6)
    assert bradley_terry_prob(0.55, 0.70, 0.15) == pytest.approx(1 - 0.731059, abs=1e-6)
    rng, n = random.Random(1234), 20000
    a_wins = sum(label_pairs("x", [" a", " b"], [0.70, 0.55], rng=rng, tau=0.15)[0]["chosen"] == " a"
                 for _ in range(n))
    thumbs_up = sum(binary_feedback("x", [" a"], [0.70], rng=rng, tau=0.15, baseline=0.55)[0]["label"]
                    for _ in range(n))
    for successes in (a_wins, thumbs_up):
        assert within_4_standard_errors(successes, n, 0.731059)
        assert not within_4_standard_errors(successes, n, 0.5)
        assert not within_4_standard_errors(successes, n, 1 / (1 + math.exp(-0.5)))


def test_default_tau_agrees_with_gold_75_to_85_percent():
    """Pairs of corpus reviews that share their first 3 words stand in for two samples for one prompt; the
    annotator's expected agreement with the gold direction, mean of max(p, 1 - p), is 75-85% with TAU."""
    corpus = make_corpus(10000, seed=8)
    groups = defaultdict(list)
    for text in corpus:
        groups[" ".join(text.split(" ")[:3])].append(gold_reward(text))
    agreements = []
    for rewards in groups.values():
        for r_a, r_b in zip(rewards[::2], rewards[1::2]):
            p = bradley_terry_prob(r_a, r_b, TAU)
            agreements.append(max(p, 1 - p))
    assert len(agreements) > 1000 and 0.75 <= sum(agreements) / len(agreements) <= 0.85


def test_label_pairs_skips_identical_completions_and_uses_trl_columns():
    stats = {}
    rows = label_pairs("the plot", [" was good .", " was good .", " was dull ."], [0.7, 0.7, 0.3],
                       rng=random.Random(0), pairs_per_prompt=3, stats=stats)
    assert stats == {"identical_pairs": 1, "pairs": 2} and len(rows) == 2
    assert all(list(row) == ["prompt", "chosen", "rejected"] and row["chosen"] != row["rejected"] for row in rows)
    assert len(label_pairs("p", [" a", " b", " c", " d"], [0.1] * 4, rng=random.Random(0), pairs_per_prompt=99)) == 6
    rows = binary_feedback("the plot", [" was good .", " was dull ."], [0.9, 0.1], rng=random.Random(0))
    assert [list(row) for row in rows] == [["prompt", "completion", "label"]] * 2
    assert [row["label"] for row in rows] == [True, False]  # sigmoid(+-0.4 / 0.15) = 0.935 / 0.065 (seeded)


def test_write_jsonl_round_trip_and_determinism(tmp_path):
    rng, rows = random.Random(0), []
    for text in make_corpus(20, seed=9):
        prompt, completion = split_prompt(text, rng)
        other = split_prompt(make_corpus(1, seed=len(rows))[0], rng)[1]
        rows += label_pairs(prompt, [completion, other], [gold_reward(prompt + completion),
                                                          gold_reward(prompt + other)], rng=rng)
    first, second = tmp_path / "a" / "prefs.jsonl", tmp_path / "b.jsonl"
    assert write_jsonl(str(first), rows) == write_jsonl(str(second), rows) == len(rows) > 0
    assert first.read_bytes() == second.read_bytes()
    assert [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()] == rows
