"""The toy world: a controlled-sentiment review generator, its gold reward and simulated annotators.

Modelled on the "controlled sentiment generation" experiment of DPO (Rafailov et al. 2023, section 6.1 and
appendix C.1): there, x is a prefix of an IMDb review, the policy writes a continuation y, and a sentiment
classifier's probability of "positive" is the gold reward r*(x, y); preferences are drawn from it. Here
everything is synthetic so that it runs anywhere with no download:
  - IMDb           -> `make_corpus`: reviews from a small probabilistic grammar, half positive, half negative;
  - the classifier -> `gold_reward(text) = sigmoid(sentiment_score(text) / SCALE)`, a transparent lexicon score;
  - prefixes       -> `split_prompt`: the first 2-8 words of a review (the paper uses 2-8 tokens);
  - people         -> `label_pairs` / `binary_feedback`: Bradley-Terry draws from the gold reward with noise tau;
                      `score_list`: scores for a whole list with the noise that gives the same pairwise draws.
Departures from the paper: the text is a toy language (~210 word types, not English), the "classifier" is an
exact hand-written lexicon score instead of a fine-tuned SiEBERT, and the paper labels pairs with the
classifier deterministically while our annotators are noisy (a BT draw), like people.

Text convention: lowercase words separated by single spaces; every sentence ends with the token "." preceded
by a space ("the plot was dull ."); 1-3 sentences and 8-30 words (not counting ".") per review.
Everything random takes an explicit seed or a `random.Random`, so results do not depend on global state.
"""
import json
import math
import os
import random
import re
from itertools import combinations

# ----------------------------------------------------------------------------- lexicon (the hidden reward)
POSITIVE_ADJECTIVES = {"good": 1.0, "great": 1.5, "fine": 0.5, "nice": 0.8, "decent": 0.5, "solid": 0.8,
                       "enjoyable": 1.0, "fun": 1.0, "charming": 1.2, "touching": 1.2, "moving": 1.2, "clever": 1.0,
                       "funny": 1.0, "beautiful": 1.5, "gripping": 1.5, "excellent": 2.0, "brilliant": 2.0,
                       "wonderful": 2.0, "superb": 2.0, "stunning": 2.0, "amazing": 2.0, "perfect": 2.5,
                       "fantastic": 2.0, "delightful": 1.5, "memorable": 1.2, "fresh": 0.8, "sharp": 0.8,
                       "smart": 1.0, "powerful": 1.5, "likeable": 0.8}
NEGATIVE_ADJECTIVES = {"bad": -1.0, "poor": -1.0, "weak": -0.8, "dull": -1.0, "boring": -1.2, "slow": -0.5,
                       "flat": -0.8, "bland": -0.8, "messy": -0.8, "silly": -0.5, "lazy": -1.0, "clumsy": -0.8,
                       "forgettable": -1.0, "predictable": -0.8, "tedious": -1.2, "awful": -2.0, "terrible": -2.0,
                       "horrible": -2.0, "dreadful": -2.0, "painful": -1.5, "pointless": -1.5, "stupid": -1.5,
                       "annoying": -1.2, "ugly": -1.2, "awkward": -0.8, "unbearable": -2.0, "lifeless": -1.5,
                       "confusing": -1.0, "cheap": -0.8, "hollow": -1.0}
SENTIMENT_NOUNS = {"masterpiece": 2.5, "gem": 2.0, "triumph": 2.0, "delight": 1.5, "treat": 1.5, "joy": 1.5,
                   "classic": 1.5, "mess": -2.0, "disaster": -2.5, "bore": -1.5, "failure": -2.0, "letdown": -1.5,
                   "disappointment": -1.5, "chore": -1.5}
VERBS = {"loved": ("love", 1.5), "enjoyed": ("enjoy", 1.0), "liked": ("like", 0.8), "adored": ("adore", 2.0),
         "admired": ("admire", 1.0), "appreciated": ("appreciate", 0.8), "hated": ("hate", -1.5),
         "disliked": ("dislike", -1.0), "loathed": ("loathe", -2.0), "despised": ("despise", -2.0)}  # past: (base, w)
EFFECTS = {"laugh": 1.0, "smile": 1.0, "think": 0.8, "care": 1.0, "cheer": 1.2,
           "yawn": -1.0, "cringe": -1.2, "sigh": -0.8, "groan": -1.0, "wince": -1.0}  # "it made me laugh"
RECOMMEND = {"recommend": 1.5}  # "i would (not) recommend it"
LEXICON = {**POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES, **SENTIMENT_NOUNS, **EFFECTS, **RECOMMEND,
           **{past: w for past, (base, w) in VERBS.items()}, **{base: w for base, w in VERBS.values()}}
ADJECTIVE_INTENSIFIERS = {"very": 1.5, "really": 1.5, "extremely": 2.0, "incredibly": 2.0, "truly": 1.5,
                          "so": 1.5, "quite": 0.7, "pretty": 0.8, "somewhat": 0.5}  # scales < 1 are downtoners
VERB_INTENSIFIERS = {"really": 1.5, "truly": 1.5, "absolutely": 2.0}
RECOMMEND_INTENSIFIERS = {"highly": 2.0, "strongly": 2.0, "really": 1.5}
INTENSIFIERS = {**ADJECTIVE_INTENSIFIERS, **VERB_INTENSIFIERS, **RECOMMEND_INTENSIFIERS}
NEGATION = "not"

# SCALE maps the raw score to a probability. The median corpus review scores +-2.5 (two or three sentiment
# words of weight 1-2), so SCALE = 1.25 gives sigmoid(+-2) ~ 0.88 / 0.12 like a confident classifier (mean
# gold reward ~0.85 on positive and ~0.16 on negative reviews); repeating strong words ("perfect perfect
# perfect" = 7.5) still drives r* to ~1 while failing is_grammatical (reward hacking).
SCALE = 1.25


def sentiment_score(text: str) -> float:
    """Hidden raw score: sum over lexicon words w of weight(w) * scale * (-1 if negated).
    A "not" flips the NEXT lexicon word (two "not"s cancel); intensifiers multiply the scale of the next
    lexicon word (stacked ones multiply); both are reset by the word they apply to and by a "." sentence end.
    Other words count 0. Any string is accepted: it is lowercased and split into letter runs and symbols."""
    score, sign, scale = 0.0, 1.0, 1.0
    for word in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
        if word == NEGATION:
            sign = -sign
        elif word in INTENSIFIERS:
            scale *= INTENSIFIERS[word]
        elif word in LEXICON:
            score += LEXICON[word] * scale * sign
            sign, scale = 1.0, 1.0
        elif word == ".":
            sign, scale = 1.0, 1.0
    return score


def sigmoid(z: float) -> float:
    """Numerically stable logistic function."""
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def gold_reward(text: str) -> float:
    """r*(text) = sigmoid(sentiment_score(text) / SCALE) in [0, 1]: the analogue of the DPO paper's sentiment
    classifier probability. Score the full review (prompt + completion), as the paper does."""
    return sigmoid(sentiment_score(text) / SCALE)


# ----------------------------------------------------------------------------- the grammar
SUBJECTS_SINGULAR = ["the acting", "the plot", "the story", "the script", "the dialogue", "the ending",
                     "the cast", "the soundtrack", "the music", "the direction", "the pacing", "the humor",
                     "the camera work", "the lead", "the villain", "the first half", "the second half",
                     "the final act", "the premise", "the editing"]
SUBJECTS_PLURAL = ["the characters", "the jokes", "the effects", "the action scenes", "the performances",
                   "the songs", "the costumes", "the twists"]
COPULAS_SINGULAR = ["was", "is", "felt", "seemed"]
COPULAS_PLURAL = ["were", "are", "felt", "seemed"]
FILMS = ["this film", "this movie", "the film", "the movie", "it"]
FILM_NOUNS = ["film", "movie", "story", "ride", "experience", "debut", "sequel", "drama", "comedy", "thriller"]
OPENERS = ["overall", "honestly", "frankly", "in the end", "to be fair", "all in all", "in short", "for me"]
TAILS = ["at times", "from start to finish", "for the most part", "throughout", "in places", "at first",
         "by the end"]
AUDIENCES = ["to everyone", "to anyone", "to my friends", "to fans of the genre", "to families"]

# A sentence template is a list of slots: UPPERCASE names are expanded by SLOTS below, lowercase tokens are
# literal words, a trailing "?" marks an optional slot, a trailing "!" a sentiment slot of the opposite polarity.
TEMPLATES = ["OPENER? SUBJECT ADJP TAIL? .", "OPENER? SUBJECT ADJP and ADJP .", "SUBJECT ADJP but SUBJECT ADJP! .",
             "OPENER? SUBJECT ADJP but ADJP! .", "OPENER? i VERBP FILM TAIL? .", "OPENER? FILM BE NOUNP .",
             "FILM EFFECTP TAIL? .", "i would RECOMMENDP FILM AUDIENCE? ."]
P_OPTIONAL, P_NEGATED, P_INTENSIFIED, P_DISSENT = 0.3, 0.15, 0.3, 0.15  # generation probabilities
MIN_WORDS, MAX_WORDS, SENTENCE_COUNTS, SENTENCE_PROBS = 8, 30, (1, 2, 3), (0.25, 0.45, 0.3)


def _pick(rng, table, polarity=None):
    """A random key of a {word: weight} table, restricted to weights of the given sign if polarity is set."""
    return rng.choice([w for w, weight in table.items() if polarity is None or weight * polarity > 0])


def _adjective_phrase(rng, polarity):
    """[not] [intensifier] adjective; a negated phrase uses an adjective of the opposite polarity ("not bad")."""
    negated = rng.random() < P_NEGATED
    words = [NEGATION] if negated else []
    if rng.random() < P_INTENSIFIED:
        words.append(_pick(rng, ADJECTIVE_INTENSIFIERS))
    adjectives = POSITIVE_ADJECTIVES if polarity * (-1 if negated else 1) > 0 else NEGATIVE_ADJECTIVES
    return words + [_pick(rng, adjectives)]


def _verb_phrase(rng, polarity):
    """[intensifier] past verb, or "did not [intensifier] base verb" ("i did not really enjoy ...")."""
    negated = rng.random() < P_NEGATED
    intensifier = [_pick(rng, VERB_INTENSIFIERS)] if rng.random() < P_INTENSIFIED else []
    past = _pick(rng, {p: w for p, (b, w) in VERBS.items()}, -polarity if negated else polarity)
    return ["did", NEGATION] + intensifier + [VERBS[past][0]] if negated else intensifier + [past]


def _noun_phrase(rng, polarity):
    """[not] a/an ([intensifier] adjective film-noun | sentiment-noun) ("not a masterpiece", "an awful film")."""
    negated = rng.random() < P_NEGATED
    head_polarity = -polarity if negated else polarity
    if rng.random() < 0.5:
        head = [_pick(rng, SENTIMENT_NOUNS, head_polarity)]
    else:
        adjectives = POSITIVE_ADJECTIVES if head_polarity > 0 else NEGATIVE_ADJECTIVES
        intensifier = [_pick(rng, ADJECTIVE_INTENSIFIERS)] if rng.random() < P_INTENSIFIED else []
        head = intensifier + [_pick(rng, adjectives), rng.choice(FILM_NOUNS)]
    article = "an" if head[0][0] in "aeiou" else "a"  # spelling rule; the lexicon avoids "u" read as "you"
    return ([NEGATION] if negated else []) + [article] + head


def _effect_phrase(rng, polarity):
    """"made me laugh" or "did not make me laugh"."""
    negated = rng.random() < P_NEGATED
    effect = _pick(rng, EFFECTS, -polarity if negated else polarity)
    return ["did", NEGATION, "make", "me", effect] if negated else ["made", "me", effect]


def _recommend_phrase(rng, polarity):
    """"[intensifier] recommend" (positive) or "not recommend" (negative), after "i would"."""
    if polarity < 0:
        return [NEGATION, "recommend"]
    return ([_pick(rng, RECOMMEND_INTENSIFIERS)] if rng.random() < P_INTENSIFIED else []) + ["recommend"]


def _subject(rng, polarity):
    plural = rng.random() < 0.3
    subjects, copulas = (SUBJECTS_PLURAL, COPULAS_PLURAL) if plural else (SUBJECTS_SINGULAR, COPULAS_SINGULAR)
    return rng.choice(subjects).split() + [rng.choice(copulas)]


def _phrase_from(options):
    return lambda rng, polarity: rng.choice(options).split()


SLOTS = {"ADJP": _adjective_phrase, "VERBP": _verb_phrase, "NOUNP": _noun_phrase, "EFFECTP": _effect_phrase,
         "RECOMMENDP": _recommend_phrase, "SUBJECT": _subject,
         "FILM": _phrase_from(FILMS), "OPENER": _phrase_from(OPENERS), "TAIL": _phrase_from(TAILS),
         "AUDIENCE": _phrase_from(AUDIENCES), "BE": _phrase_from(["was", "is"])}


def _sentence(rng, polarity):
    """Expand one template. The sentence keeps the review's polarity, except with probability P_DISSENT."""
    polarity = -polarity if rng.random() < P_DISSENT else polarity
    words = []
    for slot in rng.choice(TEMPLATES).split():
        name = slot.rstrip("?!")
        if slot.endswith("?") and rng.random() >= P_OPTIONAL:
            continue
        words += SLOTS[name](rng, -polarity if slot.endswith("!") else polarity) if name in SLOTS else [name]
    return words


def make_review(rng: random.Random, positive: bool) -> str:
    """One review whose latent sentiment is `positive`. Rejection sampling keeps 8-30 words and makes the
    gold score agree in sign with the latent sentiment (a dissenting sentence may not flip the review)."""
    polarity = 1 if positive else -1
    while True:
        n_sentences = rng.choices(SENTENCE_COUNTS, SENTENCE_PROBS)[0]
        words = [w for _ in range(n_sentences) for w in _sentence(rng, polarity)]
        text = " ".join(words)
        n_words = len(words) - words.count(".")
        if MIN_WORDS <= n_words <= MAX_WORDS and sentiment_score(text) * polarity > 0:
            return text


def make_corpus(n: int, seed: int) -> list[str]:
    """n reviews, n // 2 positive and n - n // 2 negative (exactly half for even n), in a seeded random order."""
    rng = random.Random(seed)
    labels = [True] * (n // 2) + [False] * (n - n // 2)
    rng.shuffle(labels)
    return [make_review(rng, positive) for positive in labels]


def split_prompt(text: str, rng: random.Random) -> tuple[str, str]:
    """(prompt, completion) with prompt = the first k space-separated words of text, k uniform in 2..8 (the
    DPO paper's IMDb prefixes are 2-8 tokens long), leaving at least 2 words of completion. `prompt +
    completion == text` and the completion starts with a space, so tokenizers see the same word boundary."""
    words = text.split(" ")
    if len(words) < 4:
        raise ValueError(f"too short to split into a 2-word prompt and a 2-word completion: {text!r}")
    k = rng.randint(2, min(8, len(words) - 2))
    return " ".join(words[:k]), " " + " ".join(words[k:])


def vocabulary() -> dict[str, int]:
    """Every word the grammar can emit, with a count = 1 + its frequency in make_corpus(2000, seed=0), sorted
    by decreasing count then alphabetically (deterministic). Used to train the toy BPE tokenizer."""
    words = {w for template in TEMPLATES for w in template.split() if not w.rstrip("?!").isupper()}
    for table in (LEXICON, INTENSIFIERS, SUBJECTS_SINGULAR, SUBJECTS_PLURAL, COPULAS_SINGULAR, COPULAS_PLURAL,
                  FILMS, FILM_NOUNS, OPENERS, TAILS, AUDIENCES, ["did", "make", "made", "me", "a", "an",
                                                                 "would", NEGATION]):
        words |= {w for phrase in table for w in phrase.split()}
    counts = dict.fromkeys(words, 1)
    for review in make_corpus(2000, seed=0):
        for w in review.split(" "):
            counts[w] += 1
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))


# ----------------------------------------------------------------------------- the recogniser
def _any(words) -> str:
    """Regex alternation of words or phrases, longest first."""
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


_ADJECTIVE, _ADJ_INTENSIFIER = _any({**POSITIVE_ADJECTIVES, **NEGATIVE_ADJECTIVES}), _any(ADJECTIVE_INTENSIFIERS)
_VERB_INTENSIFIER, _ARTICLE = _any(VERB_INTENSIFIERS), "(?:a (?=[^aeiou])|an (?=[aeiou]))"  # article agreement
SLOT_PATTERNS = {  # one regex per slot, accepting exactly the phrases the slot's generator above can emit
    "ADJP": f"(?:not )?(?:{_ADJ_INTENSIFIER} )?{_ADJECTIVE}",
    "VERBP": f"(?:{_VERB_INTENSIFIER} )?{_any(VERBS)}|did not (?:{_VERB_INTENSIFIER} )?"
             f"{_any(b for b, w in VERBS.values())}",
    "NOUNP": f"(?:not )?{_ARTICLE}(?:{_any(SENTIMENT_NOUNS)}|(?:{_ADJ_INTENSIFIER} )?{_ADJECTIVE} {_any(FILM_NOUNS)})",
    "EFFECTP": f"(?:made me|did not make me) {_any(EFFECTS)}",
    "RECOMMENDP": f"(?:not |{_any(RECOMMEND_INTENSIFIERS)} )?recommend",
    "SUBJECT": f"{_any(SUBJECTS_SINGULAR)} {_any(COPULAS_SINGULAR)}|{_any(SUBJECTS_PLURAL)} {_any(COPULAS_PLURAL)}",
    "FILM": _any(FILMS), "OPENER": _any(OPENERS), "TAIL": _any(TAILS), "AUDIENCE": _any(AUDIENCES),
    "BE": _any(["was", "is"])}


def _template_pattern(template: str) -> str:
    """Each slot becomes " (?:slot regex)", optional slots "(?: (?:slot regex))?"."""
    pieces = []
    for slot in template.split():
        name = slot.rstrip("?!")
        piece = f" (?:{SLOT_PATTERNS[name] if name in SLOTS else re.escape(name)})"
        pieces.append(f"(?:{piece})?" if slot.endswith("?") else piece)
    return "".join(pieces)


_SENTENCE = "(?:" + "|".join(_template_pattern(t) for t in TEMPLATES) + ")"
_REVIEW = re.compile(f"{_SENTENCE}{{{min(SENTENCE_COUNTS)},{max(SENTENCE_COUNTS)}}}")


def is_grammatical(text: str) -> bool:
    """True iff the grammar can emit `text`: 1-3 template sentences, single spaces, 8-30 words besides "."."""
    n_words = sum(1 for w in text.split(" ") if w != ".")
    return MIN_WORDS <= n_words <= MAX_WORDS and _REVIEW.fullmatch(" " + text) is not None


# ----------------------------------------------------------------------------- simulated annotators
# TAU is the annotators' noise in units of gold reward. With TAU = 0.15 an annotator agrees with the gold
# direction ~80% of the time on pairs of corpus reviews that share their first 3 words (a stand-in for two
# samples for one prompt; tests/test_toy_world.py checks 75-85%): nearly always when the two differ in
# sentiment, little better than a coin flip when both have the same sentiment.
TAU = 0.15


def bradley_terry_prob(r_a: float, r_b: float, tau: float = TAU) -> float:
    """P(a preferred to b) = sigmoid((r_a - r_b) / tau) (Bradley-Terry; DPO Eq. 1 with r = r*/tau)."""
    return sigmoid((r_a - r_b) / tau)


def label_pairs(prompt: str, completions: list[str], rewards: list[float], *, rng: random.Random,
                tau: float = TAU, pairs_per_prompt: int = 1, stats: dict | None = None) -> list[dict]:
    """Preference rows {"prompt", "chosen", "rejected"} (TRL's columns) for one prompt.
    Draws `pairs_per_prompt` distinct index pairs (i, j) uniformly without replacement (fewer if there are
    not enough), and prefers i with probability bradley_terry_prob(rewards[i], rewards[j], tau), like a noisy
    person. A drawn pair with identical texts carries no preference: it is skipped and counted in
    stats["identical_pairs"]; stats["pairs"] counts the rows returned. rewards[i] is the gold reward of
    prompt + completions[i]. Pass one `rng` for the whole data set (a fresh seed per prompt would correlate
    the labels of different prompts)."""
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards: one reward per completion")
    all_pairs = list(combinations(range(len(completions)), 2))
    rows = []
    for i, j in rng.sample(all_pairs, min(pairs_per_prompt, len(all_pairs))):
        if completions[i] == completions[j]:
            if stats is not None:
                stats["identical_pairs"] = stats.get("identical_pairs", 0) + 1
            continue
        i_wins = rng.random() < bradley_terry_prob(rewards[i], rewards[j], tau)
        chosen, rejected = (i, j) if i_wins else (j, i)
        rows.append({"prompt": prompt, "chosen": completions[chosen], "rejected": completions[rejected]})
    if stats is not None:
        stats["pairs"] = stats.get("pairs", 0) + len(rows)
    return rows


def binary_feedback(prompt: str, completions: list[str], rewards: list[float], *, rng: random.Random,
                    tau: float = TAU, baseline: float | None = None) -> list[dict]:
    """Thumbs-up/down rows {"prompt", "completion", "label": bool} (TRL's unpaired columns, as KTO uses).
    Rule: each completion is compared with a typical answer for the prompt by the same Bradley-Terry draw,
    label = True with probability sigmoid((reward - baseline) / tau), where the baseline defaults to the mean
    reward of this prompt's completions (pass e.g. 0.5 for a fixed bar). Every completion is labelled."""
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards: one reward per completion")
    baseline = sum(rewards) / len(rewards) if baseline is None and rewards else baseline
    return [{"prompt": prompt, "completion": completion, "label": rng.random() < bradley_terry_prob(r, baseline, tau)}
            for completion, r in zip(completions, rewards)]


def gumbel_noise(rng: random.Random, tau: float = TAU) -> float:
    """One draw of Gumbel(0, tau) noise: -tau log(-log U), U uniform on (0, 1)."""
    return -tau * math.log(-math.log(1.0 - rng.random()))  # 1 - random() is in (0, 1]: log(-log 1) is never taken


def score_list(prompt: str, completions: list[str], rewards: list[float], *, rng: random.Random, tau: float = TAU,
               stats: dict | None = None) -> dict | None:
    """A listwise row {"prompt", "completions", "scores"} for one prompt, scored by a noisy annotator:
    score_i = rewards[i] + Gumbel(0, tau) noise, independent per completion. The difference of two such noises is
    Logistic(0, tau), so the annotator's order of any pair (a, b) is exactly the pairwise annotators' Bradley-Terry
    draw, P(a above b) = sigmoid((r_a - r_b) / tau) = bradley_terry_prob, and the order of the whole list is a
    Plackett-Luce draw with weights exp(r / tau) (the list model PRO's loss assumes). Repeated texts are scored
    once (the first kept; stats["duplicates"] counts the others); None, counted in stats["short_lists"], when fewer
    than 2 distinct completions remain. Scores are rounded to 4 decimals."""
    if len(completions) != len(rewards):
        raise ValueError(f"{len(completions)} completions but {len(rewards)} rewards: one reward per completion")
    stats = {} if stats is None else stats
    distinct = {}
    for completion, reward in zip(completions, rewards):
        if completion in distinct:
            stats["duplicates"] = stats.get("duplicates", 0) + 1
        else:
            distinct[completion] = reward
    if len(distinct) < 2:
        stats["short_lists"] = stats.get("short_lists", 0) + 1
        return None
    scores = [round(r + gumbel_noise(rng, tau), 4) for r in distinct.values()]
    return {"prompt": prompt, "completions": list(distinct), "scores": scores}


def write_jsonl(path: str, rows: list[dict]) -> int:
    """Write one JSON object per line (keys in insertion order, UTF-8, "\\n" endings), atomically via a
    temporary file, creating parent folders. Returns the number of rows."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp_path, path)
    return len(rows)
