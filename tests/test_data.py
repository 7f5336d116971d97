"""JSONL validation with path:line errors, completion masks, truncation, filtering reports, collate, batch order."""
import itertools
import json
from functools import partial

import pytest
import torch

from nanoalign.data import (DataError, Filtered, collate, load_examples, micro_batches, read_jsonl, report,
                            tokenize_binary, tokenize_preference, tokenize_prompts, tokenize_sft, unpair)


class ByteTokenizer:
    """One token per UTF-8 byte; specials above 255 so they never collide with text."""
    eos_id, pad_id = 256, 257

    def __init__(self, bos_id=None):
        self.bos_id = bos_id

    def encode(self, text):
        return list(text.encode())


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# ---------------------------------------------------------------------------------------------- validation
GOOD = {"preference": {"prompt": "p", "chosen": "a", "rejected": "b"}, "binary": {"prompt": "p", "completion": "c", "label": True},
        "sft": {"prompt": "p", "completion": "c"}, "prompt": {"prompt": "p"}, "text": {"text": "t"}}


@pytest.mark.parametrize("fmt,bad_line,message", [
    ("preference", {"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a non-empty string, got int"),
    ("preference", {"prompt": "p", "chosen": "a", "rejected": ""}, "field 'rejected': expected a non-empty string, got an empty string"),
    ("preference", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
    ("preference", {"prompt": None, "chosen": "a", "rejected": "b"}, "field 'prompt': expected a string, got null"),
    ("sft", {"prompt": "p", "completion": ["c"]}, "field 'completion': expected a non-empty string, got list"),
    ("sft", {"prompt": "p"}, "missing field 'completion'"),
    ("sft", {"text": ""}, "field 'text': expected a non-empty string, got an empty string"),
    ("text", {"prompt": "p", "completion": "c"}, "missing field 'text'"),
    ("binary", {"prompt": "p", "completion": "c", "label": 1}, "field 'label': expected true or false, got int"),
    ("binary", {"prompt": "p", "completion": "c", "label": "true"}, "field 'label': expected true or false, got string"),
    ("binary", {"prompt": "p", "completion": "c"}, "missing field 'label'"),
    ("prompt", {"prompt": ""}, "field 'prompt': expected a non-empty string, got an empty string"),
    ("sft", {"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant turn"),
    ("preference", {"messages": [{"role": "user", "content": "hi"}]}, "missing field 'prompt' ('messages' rows are sft data"),
    ("preference", {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "a"}],
                    "rejected": [{"role": "assistant", "content": "b"}]}, "field 'chosen': a conversational completion holds assistant messages only"),
    ("preference", {"prompt": [{"role": "user", "content": "hi"}], "chosen": "a",
                    "rejected": [{"role": "assistant", "content": "b"}]}, "field 'chosen': messages must be a non-empty list"),
    ("binary", {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "a"}]},
     "missing field 'label'"),
    ("prompt", {"prompt": [{"role": "human", "content": "hi"}]}, "field 'prompt': message 0 must be"),
    ("sft", '{"prompt": "p", "completion": ', "not valid JSON (Expecting value"),
    ("sft", '["p", "c"]', "expected a JSON object, got list"),
])
def test_bad_row_names_file_line_and_field(tmp_path, fmt, bad_line, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[fmt], "", GOOD[fmt], bad_line])  # line 2 is blank
    with pytest.raises(DataError) as e:
        read_jsonl(path, fmt)
    assert str(e.value).startswith(f"{path}:4: ") and message in str(e.value)


def test_good_rows_are_read_and_extra_columns_kept(tmp_path):
    rows = [{"prompt": "", "chosen": "a", "rejected": "b", "source": "x"}, {"prompt": "q", "chosen": "c", "rejected": "d"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows + [""])
    assert read_jsonl(path, "preference") == rows  # empty prompt allowed offline; trailing blank line skipped
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, {"text": "t"}])
    assert len(read_jsonl(sft, "sft")) == 2  # both sft shapes mix in one file


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: no rows"):
        read_jsonl(empty, "sft")
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        read_jsonl(tmp_path / "nope.jsonl", "sft")


# ---------------------------------------------------------------------------------------------- tokenising
def test_sft_mask_is_exactly_completion_plus_eos():
    """prompt "ab" (97, 98), completion "c" (99), bos 300:
    ids  = [300, 97, 98, 99, 256]
    mask = [  0,  0,  0,  1,   1]   (completion and EOS only)"""
    examples, filtered = tokenize_sft([{"prompt": "ab", "completion": "c"}], ByteTokenizer(bos_id=300), max_len=16)
    assert examples == [{"input_ids": [300, 97, 98, 99, 256], "loss_mask": [0, 0, 0, 1, 1]}]
    assert filtered == Filtered()
    text_examples, _ = tokenize_sft([{"text": "hi"}], ByteTokenizer(bos_id=300), max_len=16)
    assert text_examples == [{"input_ids": [300, 104, 105, 256], "loss_mask": [0, 1, 1, 1]}]  # all text is completion


def test_long_prompt_is_cut_from_the_left_and_completion_kept():
    """max_len 6, no bos: completion "xy" + EOS take 3, so the prompt keeps its LAST 3 bytes "def"."""
    examples, filtered = tokenize_sft([{"prompt": "abcdef", "completion": "xy"}], ByteTokenizer(), max_len=6)
    assert examples == [{"input_ids": list(b"defxy") + [256], "loss_mask": [0, 0, 0, 1, 1, 1]}]
    assert filtered.truncated == 1 and not filtered.dropped


def test_too_long_completion_dropped_but_exact_fit_kept():
    """bos + "abcd" + EOS = 6 tokens: fits max_len 6 with the whole prompt cut, not max_len 5."""
    rows = [{"prompt": "pp", "completion": "abcd"}]
    kept, filtered = tokenize_sft(rows, ByteTokenizer(bos_id=300), max_len=6)
    assert kept == [{"input_ids": [300, 97, 98, 99, 100, 256], "loss_mask": [0, 1, 1, 1, 1, 1]}]
    assert filtered.truncated == 1
    dropped, filtered = tokenize_sft(rows, ByteTokenizer(bos_id=300), max_len=5)
    assert dropped == [] and filtered.dropped == {"too_long": 1}


def test_preference_shares_one_prompt_and_drops_ties():
    """max_len 7: the longer answer "xyz" + EOS takes 4, so both sequences keep the prompt's last 3 bytes."""
    rows = [{"prompt": "abcde", "chosen": "xyz", "rejected": "w"},
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "far too long", "rejected": "w"}]
    examples, filtered = tokenize_preference(rows, ByteTokenizer(), max_len=7)
    assert examples == [{"chosen_ids": list(b"cdexyz") + [256], "chosen_mask": [0, 0, 0, 1, 1, 1, 1],
                         "rejected_ids": list(b"cdew") + [256], "rejected_mask": [0, 0, 0, 1, 1]}]
    assert filtered.dropped == {"chosen_equals_rejected": 1, "too_long": 1} and filtered.truncated == 1


def test_binary_labels_follow_their_rows_and_unpair():
    rows = unpair([{"prompt": "p", "chosen": "good", "rejected": "a very long bad answer"},
                   {"prompt": "q", "chosen": "ok", "rejected": "no"}])
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("good", True), ("a very long bad answer", False), ("ok", True), ("no", False)]
    examples, filtered = tokenize_binary(rows, ByteTokenizer(), max_len=8)  # the long one is dropped
    assert [(bytes(e["input_ids"][1:-1]).decode(), e["label"]) for e in examples] == [
        ("good", True), ("ok", True), ("no", False)]
    assert filtered.dropped == {"too_long": 1}


def test_prompts_cut_from_the_left_to_max_prompt_len():
    examples, filtered = tokenize_prompts([{"prompt": "abcdef"}, {"prompt": "ab"}], ByteTokenizer(bos_id=300), 4)
    assert examples == [{"prompt_ids": [300, 100, 101, 102]}, {"prompt_ids": [300, 97, 98]}]
    assert filtered.truncated == 1


def test_report_is_one_line_with_counts(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3 + [{"prompt": "p", "chosen": "a", "rejected": "a"}]
    rows += [{"prompt": "p", "chosen": "x" * 50, "rejected": "b"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", rows)
    lines = []
    examples = load_examples(path, "preference", ByteTokenizer(), max_len=16, log=lines.append)
    assert len(examples) == 3
    assert lines == [f"data {path}: kept 3 of 5 (dropped: chosen_equals_rejected 1, too_long 1)"]
    lines.clear()
    report(Filtered(), "x.jsonl", 7, log=lines.append)
    assert lines == ["data x.jsonl: kept 7 of 7"]


# ---------------------------------------------------------------------------------------------- collate
def test_collate_sft_right_pads_with_masks_and_labels():
    examples = [{"input_ids": [1, 2, 3], "loss_mask": [0, 1, 1], "label": True},
                {"input_ids": [4], "loss_mask": [1], "label": False}]
    batch = collate(examples, pad_id=9)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 9, 9]] and batch["input_ids"].dtype == torch.long
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]] and batch["loss_mask"].dtype == torch.float32
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["label"].tolist() == [True, False] and batch["label"].dtype == torch.bool


def test_collate_preference_stacks_chosen_then_rejected():
    examples = [{"chosen_ids": [1, 2], "chosen_mask": [0, 1], "rejected_ids": [1, 3, 3], "rejected_mask": [0, 1, 1],
                 "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.0},
                {"chosen_ids": [5], "chosen_mask": [1], "rejected_ids": [6], "rejected_mask": [1],
                 "ref_chosen_logps": -0.5, "ref_rejected_logps": -3.0}]
    batch = collate(examples, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 0], [5, 0, 0], [1, 3, 3], [6, 0, 0]]  # (2B, T)
    assert batch["loss_mask"].tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -0.5] and batch["ref_rejected_logps"].dtype == torch.float32


def test_collate_prompts_stay_ragged():
    assert collate([{"prompt_ids": [1, 2]}, {"prompt_ids": [3]}], pad_id=0) == {"prompt_ids": [[1, 2], [3]]}


# ---------------------------------------------------------------------------------------------- batch order
def ids_collate(examples):
    return {"ids": list(examples)}


def step_examples(n, micro, accum, world, seed, steps, start_step=0):
    """For each optimizer step, the sorted union of examples over all ranks and micro-steps."""
    streams = [micro_batches(list(range(n)), micro, accum, rank, world, seed, start_step, ids_collate)
               for rank in range(world)]
    per_step = []
    for _ in range(steps):
        per_step.append(sorted(i for stream in streams for batch in itertools.islice(stream, accum) for i in batch["ids"]))
    return per_step


def test_same_examples_per_step_for_any_world_and_accum_split():
    """10 examples, global batch 4: 2 steps per epoch, the last 2 examples of each epoch dropped."""
    one_process = step_examples(10, micro=2, accum=2, world=1, seed=3, steps=6)
    two_processes = step_examples(10, micro=2, accum=1, world=2, seed=3, steps=6)
    assert one_process == two_processes
    assert step_examples(10, micro=4, accum=1, world=1, seed=3, steps=6) == one_process
    for epoch in range(3):  # within an epoch no example repeats, and epochs are reshuffled
        first, second = one_process[2 * epoch], one_process[2 * epoch + 1]
        assert len(set(first) | set(second)) == 8
    assert one_process[0:2] != one_process[2:4]


def test_ranks_get_disjoint_chunks_in_rank_major_order():
    everything = next(micro_batches(list(range(8)), 8, 1, 0, 1, 0, 0, ids_collate))["ids"]  # the global batch itself
    rank1 = micro_batches(list(range(8)), 2, 2, 1, 2, 0, 0, ids_collate)  # rank 1 of 2, accum 2
    assert [next(rank1)["ids"], next(rank1)["ids"]] == [everything[4:6], everything[6:8]]  # chunks 2 and 3


def test_start_step_equals_consuming_the_first_steps():
    fresh = micro_batches(list(range(12)), 2, 2, 1, 2, 7, 0, ids_collate)
    for _ in range(5 * 2):  # 5 optimizer steps of 2 micro-steps on this rank (crosses an epoch boundary)
        next(fresh)
    resumed = micro_batches(list(range(12)), 2, 2, 1, 2, 7, 5, ids_collate)
    assert [next(resumed)["ids"] for _ in range(6)] == [next(fresh)["ids"] for _ in range(6)]


def test_skipped_steps_are_not_collated():
    calls = []
    stream = micro_batches(list(range(8)), 2, 1, 0, 1, 0, 100, lambda ex: calls.append(ex) or ex)
    next(stream)
    assert len(calls) == 1


def test_too_few_examples_for_one_global_batch():
    with pytest.raises(DataError, match="3 examples, fewer than one global batch of 4"):
        next(micro_batches([0, 1, 2], 2, 1, 0, 2, 0, 0, partial(collate, pad_id=0)))


def test_messages_rows_render_with_the_chat_format_and_mask_only_assistant_turns(tmp_path):
    """sft rows may be conversational: rendered by nanoalign.chat (plain format for non-HF tokenizers), loss only on
    the assistant's content and its end-of-turn token; a row without an assistant turn is a file:line error."""
    from nanoalign.chat import render_messages
    from nanoalign.data import tokenize_sft
    from nanoalign.tokenizer import get_tokenizer
    tok = get_tokenizer("bytes")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    rows = read_jsonl(path, "sft")
    (example,), filtered = tokenize_sft(rows, tok, 512)
    ids, mask = render_messages(messages, tok, "plain")
    assert example == {"input_ids": ids, "loss_mask": mask}
    target = tok.decode([i for i, m in zip(ids, mask) if m])
    assert target.strip().startswith("hello") and "hi" not in target
    path.write_text(json.dumps({"messages": messages[:1]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages': no assistant turn"):
        read_jsonl(path, "sft")
    path.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:1: field 'messages'"):
        read_jsonl(path, "sft")


def test_conversational_rows_render_prompt_and_answers_in_the_chat_format(tmp_path):
    """TRL's conversational columns: "prompt" a list of messages, each answer a list of assistant messages. The prompt
    renders up to the assistant header (exactly what prompt-only rows give the policy to continue), the loss covers
    each answer's content and its end-of-turn token and nothing of the prompt, earlier assistant turns included."""
    from nanoalign.chat import render_messages
    from nanoalign.tokenizer import get_tokenizer
    tok = get_tokenizer("bytes")
    prompt = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
              {"role": "user", "content": "rate it"}]
    good, bad = [{"role": "assistant", "content": "great"}], [{"role": "assistant", "content": "awful, truly"}]
    row = {"prompt": prompt, "chosen": good, "rejected": bad}
    path = write_jsonl(tmp_path / "chat_prefs.jsonl", [row, {**row, "rejected": good}])
    (example,) = load_examples(path, "preference", tok, 512, log=lambda line: None)  # chosen == rejected: dropped
    prompt_ids = render_messages(prompt, tok, "plain", add_generation_prompt=True)[0]
    assert tok.decode(prompt_ids).endswith("User: rate it\n\nAssistant:")
    for side, answer in (("chosen", "great"), ("rejected", "awful, truly")):
        ids, mask = example[f"{side}_ids"], example[f"{side}_mask"]
        assert ids == render_messages(prompt + row[side], tok, "plain")[0]
        assert ids[:len(prompt_ids)] == prompt_ids and not any(mask[:len(prompt_ids)])
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == f" {answer}<|endoftext|>"  # answer + EOS only
    binary = write_jsonl(tmp_path / "chat_binary.jsonl", [{"prompt": prompt, "completion": good, "label": True}])
    (kto_example,) = load_examples(binary, "binary", tok, 512, log=lambda line: None)
    assert (kto_example["input_ids"], kto_example["loss_mask"]) == (example["chosen_ids"], example["chosen_mask"])
    prompts = write_jsonl(tmp_path / "chat_prompts.jsonl", [{"prompt": prompt}])
    assert load_examples(prompts, "prompt", tok, 512, log=lambda line: None) == [{"prompt_ids": prompt_ids}]
    sft = write_jsonl(tmp_path / "chat_sft.jsonl", [{"prompt": prompt, "completion": good}])
    (sft_example,) = load_examples(sft, "sft", tok, 512, log=lambda line: None)
    assert sft_example == {"input_ids": example["chosen_ids"], "loss_mask": example["chosen_mask"]}


def test_conversational_rows_over_max_len_are_dropped_whole_and_counted(tmp_path):
    """A conversational row is never cut (a cut could split a turn): a pair with either side too long is dropped
    once and reported; a prompt longer than max_prompt_len is dropped too."""
    from nanoalign.tokenizer import get_tokenizer
    tok = get_tokenizer("bytes")
    prompt = [{"role": "user", "content": "hi"}]
    short, long = [{"role": "assistant", "content": "ok"}], [{"role": "assistant", "content": "x" * 100}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": short, "rejected": long},
                                              {"prompt": prompt, "chosen": long, "rejected": short},
                                              {"prompt": prompt, "chosen": short, "rejected": [{"role": "assistant", "content": "no"}]}])
    lines = []
    examples = load_examples(path, "preference", tok, 60, log=lines.append)
    assert len(examples) == 1 and lines == [f"data {path}: kept 1 of 3 (dropped: too_long 2)"]
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": prompt}, {"prompt": [{"role": "user", "content": "y" * 80}]}])
    assert len(load_examples(prompts, "prompt", tok, 512, max_prompt_len=40, log=lines.append)) == 1
    assert lines[-1] == f"data {prompts}: kept 1 of 2 (dropped: too_long 1)"


def test_non_utf8_bytes_name_the_file_line_and_byte(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"):
        read_jsonl(path, "text")


def test_a_broken_config_json_and_a_corrupt_safetensors_file_name_the_file(tmp_path):
    from nanoalign.hf.config import read_hf_config
    from nanoalign.hf.weights import read_weights
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        read_hf_config(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read the weights"):
        read_weights(tmp_path)


def test_implicit_prompt_preference_rows_get_the_shared_prefix_as_prompt(tmp_path):
    """TRL's conversational rows without a "prompt": chosen and rejected share their first messages."""
    user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    row = {"chosen": user + [{"role": "assistant", "content": "Blue."}],
           "rejected": user + [{"role": "assistant", "content": "Well, there are many colours..."}]}
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (parsed,) = read_jsonl(path, "preference")
    assert parsed["prompt"] == user and parsed["chosen"] == [{"role": "assistant", "content": "Blue."}]
    assert parsed["rejected"] == [{"role": "assistant", "content": "Well, there are many colours..."}]
    bad = {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]}
    path.write_text(json.dumps(bad) + "\n")
    with pytest.raises(DataError, match="prefs.jsonl:1: field 'prompt': messages must be a non-empty list"):  # no shared turn
        read_jsonl(path, "preference")
