"""Chat formats: a `messages` list -> token ids and a loss mask that is 1 on the assistant turns only.

Two kinds of format (`template`):
  a ChatTemplate   the model's own Jinja template (chat_template.jinja or tokenizer_config.json's chat_template),
                   rendered with jinja2 as transformers renders it, so the ids equal
                   `tokenizer.apply_chat_template(messages, add_generation_prompt=...)`, default system prompt included;
  "plain"          hand-written, for tokenizers without a template (the toy world, base GPT-2):
                   "System: ...\\n\\nUser: ...\\n\\nAssistant: {content}<EOS>"
chat_template_for(spec) picks the one a tokenizer's directory implies.

The loss covers each assistant message's content and its end-of-turn token (<|im_end|>, <|eot_id|>, EOS), which is
where generation must stop; role headers and what follows the end-of-turn token (ChatML's "\\n") are prompt.
A template is rendered once for the whole conversation and the text tokenised once, as transformers does; the
assistant spans come from rendering prefixes of the conversation (the text before message i with the generation
prompt, and the text up to message i), and a token is in the loss when its bytes overlap a span. A token that
straddles a span's start (content that starts with "\\n" right after ChatML's "assistant\\n") is in the loss.
The template's special tokens (HF's special added tokens, e.g. <|im_start|>) are found in the rendered text and
inserted as ids. Departures from transformers: message content that contains such a token's text is an error (HF
would tokenise it as the special token, letting data inject a turn boundary; Tokenizer.encode never does), and
templates that use tools, documents or {% generation %} blocks get no tools or documents.
"""
import functools
import json
from datetime import datetime
from pathlib import Path

import regex

TEMPLATES = ("plain",)  # the hand-written formats; a model's own template is a ChatTemplate
ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """A model's Jinja chat template plus the special-token strings transformers passes to it (bos_token, ...).
    `source` names where it came from, for error messages."""

    def __init__(self, text, special_tokens=None, source="<template>"):
        self.text, self.special_tokens, self.source = text, dict(special_tokens or {}), source
        self.compiled = _compile(text)

    def render(self, messages, add_generation_prompt=False):
        return self.compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                                    documents=None, **self.special_tokens)

    def __repr__(self):
        return f"ChatTemplate({self.source})"


@functools.lru_cache(maxsize=32)
def _compile(text):
    """jinja2 with transformers' settings: a sandbox, trim_blocks and lstrip_blocks on (keep_trailing_newline off),
    loop controls, and the globals templates call: raise_exception, strftime_now, a tojson that keeps non-ASCII."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as err:
        raise ImportError("a model's chat template is rendered with jinja2: pip install nanoalign[hf]") from err

    class Generation(jinja2.ext.Extension):  # {% generation %}...{% endgeneration %}: render the body as it is
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, Generation])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(text)


def _check(messages):
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {ROLES}, 'content': str}}, got {m!r}")


def render_messages(messages, tokenizer, template="plain", add_generation_prompt=False, loss_from=0):
    """(ids, loss_mask) lists for `messages` in `template` (a ChatTemplate or "plain"); add_generation_prompt
    appends the assistant header (for prompt-only rows that the policy completes). Only assistant messages at index
    >= loss_from are in the loss (loss_from=len(prompt) trains on a completion only). With "plain", the tokenizer's
    BOS, when it has one, comes first; a ChatTemplate writes its own."""
    _check(messages)
    if isinstance(template, ChatTemplate):
        return _render_template(messages, tokenizer, template, add_generation_prompt, loss_from)
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; supported: a model's chat_template.jinja, "
                         f"{', '.join(TEMPLATES)}")
    ids = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        sep = "" if i == 0 else "\n\n"
        if m["role"] != "assistant":
            pieces = [(f"{sep}{m['role'].capitalize()}: {m['content']}", 0)]
        else:  # the space belongs to the completion: " Hello" is one natural token, "Assistant: " + "Hello" is not
            loss = int(i >= loss_from)
            pieces = [(f"{sep}Assistant:", 0), (f" {m['content']}", loss), (None, loss)]  # None: EOS
        for text, loss in pieces:
            piece_ids = [tokenizer.eos_id] if text is None else tokenizer.encode(text)
            ids += piece_ids
            mask += [loss] * len(piece_ids)
    if add_generation_prompt:
        header = tokenizer.encode("\n\nAssistant:")
        ids, mask = ids + header, mask + [0] * len(header)
    return ids, mask


def _render_template(messages, tokenizer, template, add_generation_prompt, loss_from):
    specials = sorted(tokenizer.template_tokens, key=len, reverse=True)  # longest first: no prefix wins early
    for i, m in enumerate(messages):
        if found := [t for t in specials if t in m["content"]]:
            raise ValueError(f"message {i} contains {found[0]!r}, a special token of {template.source}: as text it "
                             "would become a turn boundary; remove it from the data")
    text = tokenizer.normalize(template.render(messages, add_generation_prompt))
    spans = []  # character spans of the assistant answers in `text`
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i >= loss_from:
            start = _prefix(tokenizer.normalize(template.render(messages[:i], True)), text, template)
            end = _prefix(tokenizer.normalize(template.render(messages[:i + 1])), text, template)
            turn = text[start:end]
            last_special = max((turn.rfind(t) + len(t) for t in specials if t in turn), default=len(turn.rstrip()))
            spans.append((start, start + last_special))  # content + end-of-turn token; not ChatML's "\n" after it
    ids, offsets, at = [], [], 0  # offsets: (start, end) byte offsets of each token in text
    for piece in regex.split("(" + "|".join(map(regex.escape, specials)) + ")", text) if specials else [text]:
        if piece in tokenizer.template_tokens:
            pairs = [(tokenizer.encoding.encode_single_token(piece), piece.encode())]
        else:
            pairs = tokenizer.encode_pieces(piece)
            if b"".join(b for _, b in pairs) != piece.encode():
                raise ValueError(f"tokenizer {tokenizer.spec!r} does not encode text byte for byte, so the "
                                 "assistant tokens of a chat template cannot be found")
        for i, b in pairs:
            if i is not None:  # None: a byte the vocabulary lacks, dropped as HF drops it
                ids.append(i)
                offsets.append((at, at + len(b)))
            at += len(b)
    byte_spans = [(len(text[:s].encode()), len(text[:e].encode())) for s, e in spans]
    mask = [int(any(s < e_tok and s_tok < e for s, e in byte_spans)) for s_tok, e_tok in offsets]
    return ids, mask


def _prefix(part, text, template):
    """len(part), checked to be a prefix of the whole conversation's rendering (what the loss spans rely on)."""
    if not text.startswith(part):
        raise ValueError(f"{template.source}: rendering the conversation up to a message is not a prefix of "
                         "rendering all of it, so the assistant answers cannot be located for the loss mask")
    return len(part)


def user_content(prompt_text, template, stops=()):
    """The content of the last user message in a rendered prompt (e.g. decoded rollout prompts, for a judge), found
    between the template's user header and what follows user content (the footer). `stops`: special-token texts
    that may be missing from the text (a rollout decodes its prompts without EOS, ChatML's <|im_end|>): the footer
    without one of them also ends the content, and so does any of them. The whole text if it has no such header."""
    probe = "\x00nanoalign-probe\x00"
    before = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    after = template.render([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": probe}], add_generation_prompt=True)
    header, _, footer = after[len(before):].partition(probe)
    start = prompt_text.rfind(header)
    if not header or start < 0:
        return prompt_text
    start += len(header)
    ends = [footer, *(footer.replace(t, "") for t in stops if t in footer), *stops]
    ends = [i for i in (prompt_text.find(t, start) for t in ends if t) if i >= 0]
    return prompt_text[start:min(ends, default=len(prompt_text))]


def chat_template_for(spec_or_dir):
    """The format of a tokenizer: the ChatTemplate of an HF directory's chat_template.jinja or tokenizer_config.json
    (`spec_or_dir`: a directory or an "hf:<dir>" tokenizer spec), "plain" when there is none (non-HF tokenizers,
    base GPT-2). The template gets bos_token, eos_token, unk_token and pad_token from tokenizer_config.json."""
    d = Path(str(spec_or_dir).removeprefix("hf:"))
    if not d.is_dir():
        return "plain"
    config = json.loads((d / "tokenizer_config.json").read_text()) if (d / "tokenizer_config.json").exists() else {}
    source, text = d / "chat_template.jinja", None
    if source.exists():
        text = source.read_text()
    elif text := config.get("chat_template"):
        source = d / "tokenizer_config.json"
        if isinstance(text, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            text = next((t["template"] for t in text if t.get("name") == "default"), text[0]["template"])
    if not text:
        return "plain"
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = config.get(name)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None:
            special[name] = value
    return ChatTemplate(text, special, source=str(source))
