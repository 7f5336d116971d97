"""JSONL datasets -> token lists with completion masks -> padded tensors, in a resumable order.

Formats use TRL's standard columns (extra columns are kept and ignored):
    sft         {"prompt", "completion"} or {"text"} or {"messages": [{"role", "content"}, ...]}
    text        {"text"}
    preference  {"prompt", "chosen", "rejected"}
    binary      {"prompt", "completion", "label": true|false}    (KTO)
    prompt      {"prompt"}                                         (online algorithms)
    listwise    {"prompt", "completions": [k >= 2], "scores": [k numbers, higher is better]}, or
                {"prompt", "ranking": [k >= 2, best first]}          (PRO, RRHF, LiPO)
Conversational rows, as in TRL: "prompt" is a list of messages and each completion ("completion", "chosen",
"rejected", every item of "completions" / "ranking") a list holding assistant messages. They are rendered in the
model's chat format (nanoalign/chat.py):
the prompt with the assistant header that opens the answer (as at generation time), the loss on the assistant
messages and their end-of-turn token; such a row over max_len is dropped (counted), not cut, as it could split a turn.
Every bad row raises DataError naming `path:line` and the field. Rows dropped while tokenising (too
long, chosen == rejected, a list whose scores all tie) are counted in a Filtered record and reported in one line,
never lost silently.

Listwise rows (the format has no TRL counterpart; the columns follow TRL's naming): k >= 2 distinct completions of
one prompt with one finite number each, higher = better. Scores may tie: tied completions are neither preferred to
each other nor penalised against each other (each loss says how it treats a tie), and a list whose scores ALL tie
carries no ranking and is dropped (counted, "all_scores_tied"). A "ranking" row is read as completions with scores
k-1, ..., 1, 0 (best first; the gains of LiPO see these integers). The same completion text twice in one list is an
error (it could hold two different ranks): merge or drop one. A list is kept or dropped whole: over max_len the
shared prompt is cut from the left to fit the LONGEST completion, and a conversational list with any completion too
long is dropped.

Sequences are [bos] + prompt + completion + [eos] (bos only if the tokenizer has one); prompt and
completion are encoded separately so the loss mask boundary is exact. Over max_len, the prompt is cut
from the LEFT (the end of the prompt, next to the answer, is kept); if the completion + EOS alone does
not fit, the example is dropped.
"""
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from nanoalign.chat import _check, chat_template_for, render_messages

FORMATS = ("sft", "text", "preference", "binary", "prompt", "listwise")
COMPLETION_FIELDS = {"sft": ("completion",), "text": (), "preference": ("chosen", "rejected"),
                     "binary": ("completion",), "prompt": (), "listwise": ()}
JSON_TYPE_NAMES = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object",
                   type(None): "null"}


class DataError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------- reading
def read_jsonl(path, fmt: str) -> list[dict]:
    """Read and validate one JSON object per line; blank lines are skipped."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; expected one of {FORMATS}")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    rows = []
    for line_number, raw in enumerate(lines, start=1):
        where = f"{path}:{line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {_type_name(row)}")
        row = implicit_prompt(row) if fmt == "preference" else row
        _validate(row, fmt, where)
        rows.append(scored_list(row) if fmt == "listwise" else row)
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def implicit_prompt(row: dict) -> dict:
    """TRL's implicit-prompt preference rows: "chosen" and "rejected" are whole conversations that share their first
    messages; those become "prompt" and the rest the two completions (TRL's extract_prompt). Other rows as they are."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if "prompt" in row or not isinstance(chosen, list) or not isinstance(rejected, list):
        return row
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and isinstance(chosen[shared - 1], dict) and chosen[shared - 1].get("role") == "assistant":
        shared -= 1  # an identical assistant turn at the end belongs to both answers, not to the prompt
    return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def scored_list(row: dict) -> dict:
    """A validated listwise row as {"prompt", "completions", "scores"}: a "ranking" row (best first) gets the scores
    k-1, ..., 1, 0; a scored row is returned as it is. Other columns are kept."""
    if "ranking" not in row:
        return row
    ranking = row["ranking"]
    rest = {k: v for k, v in row.items() if k != "ranking"}
    return {**rest, "completions": ranking, "scores": [float(len(ranking) - 1 - i) for i in range(len(ranking))]}


def _validate_listwise(row: dict, where: str) -> None:
    """k >= 2 distinct completions (strings, or lists of assistant messages when the prompt is conversational) and,
    beside "completions", as many finite scores; or "ranking" alone."""
    if "ranking" in row and ("completions" in row or "scores" in row):
        raise DataError(f"{where}: field 'ranking': give either 'ranking' (best first) or 'completions' with "
                        "'scores', not both")
    if "ranking" not in row and "completions" not in row:
        raise DataError(f"{where}: missing field 'completions' (with 'scores') or 'ranking' (best first)")
    name = "ranking" if "ranking" in row else "completions"
    items = row[name]
    if not isinstance(items, list) or len(items) < 2:
        got = f"a list of {len(items)}" if isinstance(items, list) else _type_name(items)
        raise DataError(f"{where}: field {name!r}: expected a list of at least 2 completions, got {got}")
    conversational = isinstance(row.get("prompt"), list)
    if conversational:
        _check_messages(row, "prompt", where, assistant_only=False)
    else:
        _check_string(row, "prompt", where, allow_empty=True)
    for i, item in enumerate(items):
        if conversational:
            _check_messages({f"{name}[{i}]": item}, f"{name}[{i}]", where, assistant_only=True)
        else:
            _check_string({f"{name}[{i}]": item}, f"{name}[{i}]", where, allow_empty=False)
    first = {}
    for i, item in enumerate(items):
        key = json.dumps(item, sort_keys=True)
        if key in first:
            raise DataError(f"{where}: field {name!r}: items {first[key]} and {i} are the same completion; a "
                            "completion has one place in a list (merge or drop the copy)")
        first[key] = i
    if name == "ranking":
        return
    if "scores" not in row:
        raise DataError(f"{where}: missing field 'scores' (one number per completion, higher is better; or give "
                        "'ranking', best first, instead of 'completions')")
    scores = row["scores"]
    if not isinstance(scores, list) or len(scores) != len(items):
        got = f"a list of {len(scores)}" if isinstance(scores, list) else _type_name(scores)
        raise DataError(f"{where}: field 'scores': expected a list of {len(items)} numbers (one per completion), "
                        f"got {got}")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            got = repr(score) if isinstance(score, float) else _type_name(score)
            raise DataError(f"{where}: field 'scores[{i}]': expected a finite number, got {got}")


def _validate(row: dict, fmt: str, where: str) -> None:
    if fmt == "listwise":
        _validate_listwise(row, where)
        return
    if fmt == "sft" and "messages" in row and "completion" not in row:  # conversational: nanoalign/chat.py renders it
        try:
            _check(row["messages"])
        except ValueError as e:
            raise DataError(f"{where}: field 'messages': {e}") from None
        if not any(m["role"] == "assistant" for m in row["messages"]):
            raise DataError(f"{where}: field 'messages': no assistant turn, so nothing to train on")
        return
    if isinstance(row.get("prompt"), list) and fmt != "text":  # conversational prompt (and completions)
        _check_messages(row, "prompt", where, assistant_only=False)
        for name in ("completion",) if fmt == "sft" else COMPLETION_FIELDS[fmt]:
            _check_messages(row, name, where, assistant_only=True)
        if fmt == "binary" and not isinstance(row.get("label"), bool):
            _missing_or_wrong(row, "label", where, "true or false")
        return
    if fmt == "text" or (fmt == "sft" and "completion" not in row and "text" in row):
        _check_string(row, "text", where, allow_empty=False)
        return
    _check_string(row, "prompt", where, allow_empty=fmt != "prompt")  # an empty prompt is fine for offline data
    for name in COMPLETION_FIELDS[fmt]:
        _check_string(row, name, where, allow_empty=False)
    if fmt == "binary" and not isinstance(row.get("label"), bool):
        _missing_or_wrong(row, "label", where, "true or false")


def _check_messages(row: dict, name: str, where: str, assistant_only: bool) -> None:
    """A conversational field: a non-empty list of {"role", "content"}; completions hold assistant turns only."""
    if name not in row:
        raise DataError(f"{where}: missing field {name!r}")
    try:
        _check(row[name])
    except ValueError as e:
        raise DataError(f"{where}: field {name!r}: {e}") from None
    if assistant_only and any(m["role"] != "assistant" for m in row[name]):
        raise DataError(f"{where}: field {name!r}: a conversational completion holds assistant messages only")


def _check_string(row: dict, name: str, where: str, allow_empty: bool) -> None:
    value = row.get(name)
    expected = "a string" if allow_empty else "a non-empty string"
    if not isinstance(value, str) or (not allow_empty and value == ""):
        _missing_or_wrong(row, name, where, expected)


def _missing_or_wrong(row: dict, name: str, where: str, expected: str) -> None:
    if name not in row:
        hint = (" ('messages' rows are sft data; conversational preference, binary and prompt rows put the messages "
                "in 'prompt' and the answers in 'chosen'/'rejected'/'completion', as TRL does)") if "messages" in row else ""
        raise DataError(f"{where}: missing field {name!r}{hint}")
    value = row[name]
    got = "an empty string" if value == "" else _type_name(value)
    raise DataError(f"{where}: field {name!r}: expected {expected}, got {got}")


def _type_name(value) -> str:
    return JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def unpair(rows: list[dict]) -> list[dict]:
    """Preference rows -> binary rows for KTO: chosen -> label True, rejected -> label False."""
    binary = []
    for row in rows:
        binary.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        binary.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return binary


# ---------------------------------------------------------------------------------------------- tokenising
@dataclass
class Filtered:
    """What tokenisation did to the rows: drops by reason, and how many prompts were cut from the left."""
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0


def report(filtered: Filtered, path, kept: int, log: Callable[[str], None] = print) -> None:
    """One line, e.g. `data prefs.jsonl: kept 998 of 1000 (dropped: too_long 1, chosen_equals_rejected 1)`."""
    total = kept + sum(filtered.dropped.values())
    line = f"data {path}: kept {kept} of {total}"
    if filtered.dropped:
        line += " (dropped: " + ", ".join(f"{reason} {n}" for reason, n in filtered.dropped.items()) + ")"
    if filtered.truncated:
        line += f"; prompt cut from the left in {filtered.truncated}"
    log(line)


def _fit_prompt(prompt_ids: list[int], budget: int, filtered: Filtered) -> list[int] | None:
    """Keep the last `budget` prompt tokens; None if the budget is negative (the completion alone is too long)."""
    if budget < 0:
        filtered.dropped["too_long"] += 1
        return None
    if len(prompt_ids) > budget:
        filtered.truncated += 1
        return prompt_ids[len(prompt_ids) - budget:]  # not prompt_ids[-budget:], which is everything when budget == 0
    return prompt_ids


def _sequence(bos: list[int], prompt_ids: list[int], completion_ids: list[int], eos_id: int) -> tuple[list, list]:
    """ids = [bos] + prompt + completion + [eos]; mask 1 on completion + eos only."""
    ids = bos + prompt_ids + completion_ids + [eos_id]
    mask = [0] * (len(bos) + len(prompt_ids)) + [1] * (len(completion_ids) + 1)
    return ids, mask


def _chat_prompt(tok, messages: list) -> list[int]:
    """The rendered prompt messages + the assistant header: what the model continues from."""
    return render_messages(messages, tok, chat_template_for(tok.spec), add_generation_prompt=True)[0]


def _chat_sequence(tok, prompt: list, completion: list, max_len: int, filtered: Filtered) -> tuple | None:
    """(ids, mask) of a conversational prompt + completion: mask 1 on the completion's assistant content and its
    end-of-turn token, 0 on the whole prompt (earlier assistant turns included); None (counted) over max_len."""
    ids, mask = render_messages(prompt + completion, tok, chat_template_for(tok.spec), loss_from=len(prompt))
    while mask and mask[-1] == 0:  # no trailing tokens after the last end-of-turn (ChatML's "\n")
        ids, mask = ids[:-1], mask[:-1]
    if len(ids) > max_len:
        filtered.dropped["too_long"] += 1
        return None
    return ids, mask


def _prompt_and_completion(row: dict) -> tuple[str, str]:
    if "completion" not in row and "text" in row:  # {"text"}: the whole text is the completion
        return "", row["text"]
    return row["prompt"], row["completion"]


def _sft_example(row: dict, tok, max_len: int, filtered: Filtered) -> dict | None:
    if "messages" in row and "completion" not in row:  # the model's chat format, loss on assistant turns only
        input_ids, loss_mask = render_messages(row["messages"], tok, chat_template_for(tok.spec))
        if len(input_ids) > max_len:  # no left cut: it could split a turn
            filtered.dropped["too_long"] += 1
            return None
        return {"input_ids": input_ids, "loss_mask": loss_mask}
    if isinstance(row.get("prompt"), list):  # conversational prompt and completion
        sequence = _chat_sequence(tok, row["prompt"], row["completion"], max_len, filtered)
        return None if sequence is None else {"input_ids": sequence[0], "loss_mask": sequence[1]}
    bos = [tok.bos_id] if tok.bos_id is not None else []
    prompt, completion = _prompt_and_completion(row)
    completion_ids = tok.encode(completion)
    prompt_ids = _fit_prompt(tok.encode(prompt), max_len - len(bos) - len(completion_ids) - 1, filtered)
    if prompt_ids is None:
        return None
    input_ids, loss_mask = _sequence(bos, prompt_ids, completion_ids, tok.eos_id)
    return {"input_ids": input_ids, "loss_mask": loss_mask}


def tokenize_sft(rows: list[dict], tok, max_len: int) -> tuple[list[dict], Filtered]:
    """-> examples {"input_ids", "loss_mask"} (lists of ints); {"text"} rows are all completion."""
    filtered = Filtered()
    examples = [_sft_example(row, tok, max_len, filtered) for row in rows]
    return [e for e in examples if e is not None], filtered


def tokenize_binary(rows: list[dict], tok, max_len: int) -> tuple[list[dict], Filtered]:
    """-> examples {"input_ids", "loss_mask", "label"} for KTO-style unpaired feedback."""
    filtered = Filtered()
    examples = [(_sft_example(row, tok, max_len, filtered), row["label"]) for row in rows]
    return [{**e, "label": label} for e, label in examples if e is not None], filtered


def tokenize_preference(rows: list[dict], tok, max_len: int) -> tuple[list[dict], Filtered]:
    """-> examples {"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask"} sharing one prompt."""
    examples, filtered = [], Filtered()
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for row in rows:
        if row["chosen"] == row["rejected"]:  # no preference signal; DPO's loss would be constant log 2
            filtered.dropped["chosen_equals_rejected"] += 1
            continue
        if isinstance(row["prompt"], list):  # conversational: both sides dropped together if either is too long
            chosen = _chat_sequence(tok, row["prompt"], row["chosen"], max_len, filtered)
            rejected = chosen and _chat_sequence(tok, row["prompt"], row["rejected"], max_len, filtered)
            if rejected:
                examples.append({"chosen_ids": chosen[0], "chosen_mask": chosen[1],
                                 "rejected_ids": rejected[0], "rejected_mask": rejected[1]})
            continue
        chosen_ids, rejected_ids = tok.encode(row["chosen"]), tok.encode(row["rejected"])
        longest = max(len(chosen_ids), len(rejected_ids))
        prompt_ids = _fit_prompt(tok.encode(row["prompt"]), max_len - len(bos) - longest - 1, filtered)
        if prompt_ids is None:
            continue
        chosen, chosen_mask = _sequence(bos, prompt_ids, chosen_ids, tok.eos_id)
        rejected, rejected_mask = _sequence(bos, prompt_ids, rejected_ids, tok.eos_id)
        examples.append({"chosen_ids": chosen, "chosen_mask": chosen_mask,
                         "rejected_ids": rejected, "rejected_mask": rejected_mask})
    return examples, filtered


def tokenize_listwise(rows: list[dict], tok, max_len: int) -> tuple[list[dict], Filtered]:
    """-> examples {"list_ids", "list_mask": k sequences sharing one prompt, "scores": k floats} (read_jsonl's rows,
    "ranking" already turned into scores). A list whose scores all tie is dropped and counted."""
    examples, filtered = [], Filtered()
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for row in rows:
        completions, scores = row["completions"], [float(s) for s in row["scores"]]
        if len(set(scores)) == 1:  # no completion is better than another: nothing to rank
            filtered.dropped["all_scores_tied"] += 1
            continue
        if isinstance(row["prompt"], list):  # conversational: the list is dropped whole if any answer is too long
            sequences = []
            for completion in completions:
                sequence = _chat_sequence(tok, row["prompt"], completion, max_len, filtered)
                if sequence is None:
                    break
                sequences.append(sequence)
            if len(sequences) == len(completions):
                examples.append({"list_ids": [s[0] for s in sequences], "list_mask": [s[1] for s in sequences],
                                 "scores": scores})
            continue
        completion_ids = [tok.encode(c) for c in completions]
        longest = max(len(ids) for ids in completion_ids)
        prompt_ids = _fit_prompt(tok.encode(row["prompt"]), max_len - len(bos) - longest - 1, filtered)
        if prompt_ids is None:
            continue
        sequences = [_sequence(bos, prompt_ids, ids, tok.eos_id) for ids in completion_ids]
        examples.append({"list_ids": [s[0] for s in sequences], "list_mask": [s[1] for s in sequences],
                         "scores": scores})
    return examples, filtered


def tokenize_prompts(rows: list[dict], tok, max_prompt_len: int) -> tuple[list[dict], Filtered]:
    """-> examples {"prompt_ids"}: [bos] + prompt, cut from the left to max_prompt_len tokens."""
    examples, filtered = [], Filtered()
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for row in rows:
        if isinstance(row["prompt"], list):  # conversational: rendered up to the assistant header, never cut
            prompt_ids = _chat_prompt(tok, row["prompt"])
            if len(prompt_ids) > max_prompt_len:
                filtered.dropped["too_long"] += 1
            else:
                examples.append({"prompt_ids": prompt_ids})
            continue
        prompt_ids = _fit_prompt(tok.encode(row["prompt"]), max_prompt_len - len(bos), filtered)
        if prompt_ids is None:
            continue
        if not bos + prompt_ids:  # nothing to condition generation on
            filtered.dropped["empty_prompt"] += 1
            continue
        examples.append({"prompt_ids": bos + prompt_ids})
    return examples, filtered


def load_examples(path, fmt: str, tok, max_len: int, max_prompt_len: int | None = None,
                  log: Callable[[str], None] = print) -> list[dict]:
    """read_jsonl + the tokenizer for `fmt` + one report line; what algorithms call."""
    rows = read_jsonl(path, fmt)
    if fmt == "prompt":
        examples, filtered = tokenize_prompts(rows, tok, max_prompt_len or max_len // 2)
    elif fmt == "preference":
        examples, filtered = tokenize_preference(rows, tok, max_len)
    elif fmt == "binary":
        examples, filtered = tokenize_binary(rows, tok, max_len)
    elif fmt == "listwise":
        examples, filtered = tokenize_listwise(rows, tok, max_len)
    else:  # sft, text
        examples, filtered = tokenize_sft(rows, tok, max_len)
    report(filtered, path, len(examples), log)
    return examples


# ---------------------------------------------------------------------------------------------- batching
TOKEN_FIELDS = ("input_ids", "loss_mask", "chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask", "prompt_ids",
                "list_ids", "list_mask", "scores")


def to_device(batch: dict, device) -> dict:
    """Every tensor of a batch moved to `device` (non-blocking); other entries as they are."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a micro-batch to its longest sequence.

    -> input_ids (B, T) long, loss_mask (B, T) float, attention_mask (B, T) long (1 on real tokens);
    preference examples give 2B rows, the B chosen first then the B rejected, padded to one length.
    Listwise examples (k_b completions each) give N = sum_b k_b rows, example 0's completions first, and
    scores (B, K) float32, valid (B, K) bool with K = max_b k_b: slot (b, j) is completion j of example b, and
    logps[valid] = per-row values puts the N rows back in their slots (row-major order).
    Other numeric fields (label, cached ref_chosen_logps, ...) -> (B,) tensors (bool stays bool, else
    float32); prompt examples -> prompt_ids as a ragged list of lists (generation pads them itself).
    """
    first = examples[0]
    if "prompt_ids" in first:
        batch = {"prompt_ids": [list(e["prompt_ids"]) for e in examples]}
    elif "list_ids" in first:
        batch = _pad([ids for e in examples for ids in e["list_ids"]], [m for e in examples for m in e["list_mask"]],
                     pad_id)
        K = max(len(e["scores"]) for e in examples)
        batch["scores"] = torch.zeros(len(examples), K)  # (B, K)
        batch["valid"] = torch.zeros(len(examples), K, dtype=torch.bool)  # (B, K)
        for b, e in enumerate(examples):
            batch["scores"][b, :len(e["scores"])] = torch.tensor(e["scores"], dtype=torch.float32)
            batch["valid"][b, :len(e["scores"])] = True
    elif "chosen_ids" in first:
        batch = _pad([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples],
                     [e["chosen_mask"] for e in examples] + [e["rejected_mask"] for e in examples], pad_id)
    else:
        batch = _pad([e["input_ids"] for e in examples], [e["loss_mask"] for e in examples], pad_id)
    for name in first:
        if name not in TOKEN_FIELDS:
            values = [e[name] for e in examples]
            dtype = torch.bool if all(isinstance(v, bool) for v in values) else torch.float32
            batch[name] = torch.tensor([float(v) if dtype == torch.float32 else v for v in values], dtype=dtype)  # (B,)
    return batch


def _pad(sequences: list[list[int]], masks: list[list[int]], pad_id: int) -> dict:
    T = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)  # (B, T)
    loss_mask = torch.zeros((len(sequences), T), dtype=torch.float32)  # (B, T)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)  # (B, T)
    for i, (ids, mask) in enumerate(zip(sequences, masks)):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[i, :len(mask)] = torch.tensor(mask, dtype=torch.float32)
        attention_mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}


def row_lengths(example) -> list[int] | None:
    """Lengths of the rows an example adds to a collated batch (a preference pair: chosen and rejected); None when
    the example is not a tokenised dict (then micro_batches does not bucket)."""
    if not isinstance(example, dict):
        return None
    if "chosen_ids" in example:
        return [len(example["chosen_ids"]), len(example["rejected_ids"])]
    if "list_ids" in example:
        return [len(ids) for ids in example["list_ids"]]
    for name in ("input_ids", "prompt_ids"):
        if name in example:
            return [len(example[name])]
    return None


def micro_batches(examples: list, micro_batch_size: int, grad_accum: int, rank: int, world_size: int,
                  seed: int, start_step: int, collate_fn: Callable[[list], dict],
                  bucket: bool = True) -> Iterator[dict]:
    """Yield this rank's micro-batches forever, grad_accum per optimizer step, starting at start_step.

    The global batch of step s (micro_batch_size * grad_accum * world_size examples) is the s-th
    consecutive slice of the epoch's permutation (torch.randperm seeded with seed + epoch; the last
    partial global batch of an epoch is dropped). It is cut into world_size * grad_accum chunks of
    micro_batch_size examples, so every (world_size, grad_accum) split of one global batch size trains on the
    same examples per step, and a resumed run (start_step = steps done) continues exactly where the crashed one
    stopped.
    Without bucketing, rank r's micro-step m gets chunk r * grad_accum + m of the permutation's order.
    With bucketing (bucket=True: the run config's bucket_by_length; only tokenised examples) the global batch is first
    sorted by length (stable: ties keep the permutation's order) before it is cut, so each micro-batch holds
    similar lengths and is padded less; sorted chunk j goes to rank j % world_size, micro-step j // world_size, so
    ranks get similar lengths. The chunks of a step depend only on the global batch and micro_batch_size, so DDP
    with W ranks x grad_accum A computes the same micro-batches as one process with grad_accum W * A, and
    per-example-mean losses (DPO, KTO, ORPO's odds ratio) get the same step gradient as without bucketing.
    Token-mean losses (SFT) weigh tokens by their micro-batch's total, as TRL's group_by_length does. Nothing
    changes when grad_accum * world_size == 1.
    """
    global_batch = micro_batch_size * grad_accum * world_size
    if len(examples) < global_batch:
        raise DataError(f"the dataset has {len(examples)} examples, fewer than one global batch of {global_batch} "
                        f"(micro_batch_size {micro_batch_size} x grad_accum {grad_accum} x world_size {world_size})")
    bucket = bucket and row_lengths(examples[0]) is not None
    step, cached_epoch, permutation = start_step, None, None
    steps_per_epoch = len(examples) // global_batch
    while True:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        if epoch != cached_epoch:  # one permutation per epoch, shared by all ranks through the seed
            generator = torch.Generator().manual_seed(seed + epoch)
            permutation, cached_epoch = torch.randperm(len(examples), generator=generator).tolist(), epoch
        batch = permutation[step_in_epoch * global_batch:(step_in_epoch + 1) * global_batch]
        if bucket:
            batch = sorted(batch, key=lambda i: max(row_lengths(examples[i])))  # stable: ties keep their order
            chunks = [batch[j * micro_batch_size:(j + 1) * micro_batch_size] for j in range(grad_accum * world_size)]
            # back to the rank-major layout read below: (rank r, micro-step m) <- sorted chunk m * world_size + r
            batch = [i for r in range(world_size) for m in range(grad_accum) for i in chunks[m * world_size + r]]
        for micro_step in range(grad_accum):
            chunk_start = (rank * grad_accum + micro_step) * micro_batch_size
            yield collate_fn([examples[i] for i in batch[chunk_start:chunk_start + micro_batch_size]])
        step += 1


def padding_fraction(examples: list, micro_batch_size: int, grad_accum: int, world_size: int, seed: int = 0,
                     bucket: bool = True) -> float:
    """Fraction of the positions in one epoch's right-padded micro-batches that are padding (all ranks together).
    A preference micro-batch pads its 2B chosen and rejected rows to one length, as collate does."""
    global_batch = micro_batch_size * grad_accum * world_size
    real, total = 0, 0
    for rank in range(world_size):
        stream = micro_batches(examples, micro_batch_size, grad_accum, rank, world_size, seed, 0,
                               lambda chunk: [n for e in chunk for n in row_lengths(e)], bucket)
        for _ in range(len(examples) // global_batch * grad_accum):
            lengths = next(stream)
            real, total = real + sum(lengths), total + len(lengths) * max(lengths)
    return 1 - real / total
