"""Chat formats: a `messages` list -> token ids and a loss mask that is 1 on the assistant turns only.

Formats (`template`):
  "chatml" (Qwen2, SmolLM2):  <|im_start|>{role}\\n{content}<|im_end|>\\n  per message
  "llama3" (Llama-3):         <|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
  "plain"  (no chat template): "System: ...\\n\\nUser: ...\\n\\nAssistant: {content}<EOS>"
The loss covers each assistant message's content and its end-of-turn token (<|im_end|>, <|eot_id|>, EOS), which
is where generation must stop; role headers and the "\\n" after <|im_end|> are prompt.
Departures from the models' own Jinja templates: no default system message is inserted (Qwen2.5's "You are
Qwen, ..." or Llama-3.1's knowledge-cutoff preamble; pass one explicitly to match them), and no tool calls.
Each segment (header, content, special token) is tokenized on its own, as at generation time when the model
continues the rendered prompt; so ids can differ from tokenizing the whole string where a token would
straddle a header and the content (e.g. content starting with a newline in ChatML).
Template special tokens are looked up by name and inserted as ids; the same text inside a message is
encoded as ordinary bytes (Tokenizer.encode), so data cannot inject a turn boundary.
"""
import json
from pathlib import Path

TEMPLATES = ("chatml", "llama3", "plain")
ROLES = ("system", "user", "assistant")


class Special(str):
    """A template token, inserted by id rather than encoded as text."""


def _chatml(role, content):
    if role != "assistant":
        return [(Special("<|im_start|>"), 0), (f"{role}\n{content}", 0), (Special("<|im_end|>"), 0), ("\n", 0)]
    return [(Special("<|im_start|>"), 0), ("assistant\n", 0), (content, 1), (Special("<|im_end|>"), 1), ("\n", 0)]


def _llama3(role, content):
    header = [(Special("<|start_header_id|>"), 0), (role, 0), (Special("<|end_header_id|>"), 0), ("\n\n", 0)]
    loss = int(role == "assistant")
    return header + [(content.strip(), loss), (Special("<|eot_id|>"), loss)]  # Llama-3's template trims content


def _plain(role, content, first):
    sep = "" if first else "\n\n"
    if role != "assistant":
        return [(f"{sep}{role.capitalize()}: {content}", 0)]
    # the space belongs to the completion: " Hello" is one natural token, "Assistant: " + "Hello" is not
    return [(f"{sep}Assistant:", 0), (f" {content}", 1), (Special("<EOS>"), 1)]


GENERATION_PROMPTS = {  # the assistant header that a prompt-only row ends with
    "chatml": [(Special("<|im_start|>"), 0), ("assistant\n", 0)],
    "llama3": [(Special("<|start_header_id|>"), 0), ("assistant", 0), (Special("<|end_header_id|>"), 0), ("\n\n", 0)],
    "plain": [("\n\nAssistant:", 0)]}


def _check(messages):
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


def render_messages(messages, tokenizer, template="plain", add_generation_prompt=False):
    """(ids, loss_mask) lists for `messages` in `template`; add_generation_prompt appends the assistant header
    (for prompt-only rows that the policy completes). The tokenizer's BOS, when it has one, comes first."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; supported: {', '.join(TEMPLATES)}")
    _check(messages)
    segments = []
    for i, m in enumerate(messages):
        if template == "plain":
            segments += _plain(m["role"], m["content"], first=i == 0)
        else:
            segments += (_chatml if template == "chatml" else _llama3)(m["role"], m["content"])
    if add_generation_prompt:
        segments += GENERATION_PROMPTS[template]
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask = [0] * len(ids)
    for piece, loss in segments:
        piece_ids = [_special_id(tokenizer, piece, template)] if isinstance(piece, Special) else tokenizer.encode(piece)
        ids += piece_ids
        mask += [loss] * len(piece_ids)
    return ids, mask


def _special_id(tokenizer, name, template):
    if name == "<EOS>":
        return tokenizer.eos_id
    try:
        return tokenizer.encoding.encode_single_token(name)
    except KeyError:
        raise ValueError(f"chat template {template!r} needs the special token {name} that tokenizer "
                         f"{tokenizer.spec!r} lacks; use template='plain'") from None


def chat_template_for(spec_or_dir):
    """The format of a model's chat template: "chatml" or "llama3" from an HF directory's chat_template.jinja
    or tokenizer_config.json (`spec_or_dir`: a directory or an "hf:<dir>" tokenizer spec), "plain" when
    there is none (non-HF tokenizers, base GPT-2). An unrecognised template is an error rather than a silent
    fallback that would train a chat model in the wrong format."""
    d = Path(str(spec_or_dir).removeprefix("hf:"))
    if not d.is_dir():
        return "plain"
    text = (d / "chat_template.jinja").read_text() if (d / "chat_template.jinja").exists() else None
    if text is None and (d / "tokenizer_config.json").exists():
        text = json.loads((d / "tokenizer_config.json").read_text()).get("chat_template")
        if isinstance(text, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            text = next((t["template"] for t in text if t.get("name") == "default"), text[0]["template"])
    if not text:
        return "plain"
    if "<|im_start|>" in text:
        return "chatml"
    if "<|start_header_id|>" in text:
        return "llama3"
    raise ValueError(f"{d}'s chat template is none of {', '.join(TEMPLATES)}; pass template='plain' to use "
                     "the plain format anyway")
