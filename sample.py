"""Generate from a checkpoint: python sample.py --ckpt=out/dpo --prompt="the film was" [--num_samples=3 ...]

--ckpt takes a nanoalign run dir / ckpt.pt, or hf:<dir> for Hugging Face weights. --prompts_file reads one
prompt per line. Prints each prompt with its samples.
"""
import argparse
import sys

import torch

import nanoalign.toy  # noqa: F401  (registers the toy world's tokenizer, which toy checkpoints name)
from nanoalign.config import ConfigError
from nanoalign.data import DataError
from nanoalign.loading import load_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run dir, ckpt.pt path, or hf:<dir>")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts_file", default="", help="a text file with one prompt per line")
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=48)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompts_file")
    model, tok = load_model(args.ckpt if args.ckpt.startswith("hf:") else f"ckpt:{args.ckpt}", args.device)
    model.eval()
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    ids = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
    ids = [x if x else [tok.eos_id] for x in ids]  # an empty prompt starts from EOS, as documents do in training
    max_new = min(args.max_new_tokens, model.cfg.block_size - max(len(x) for x in ids))
    out = model.generate([x for x in ids for _ in range(args.num_samples)], max_new, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, eos_id=tok.eos_id, pad_id=tok.pad_id,
                         generator=generator)
    for i, prompt in enumerate(prompts):
        print(f"=== {prompt!r}")
        for j in range(args.num_samples):
            row = i * args.num_samples + j
            text = tok.decode(out.tokens[row][out.mask[row].bool()].tolist())
            print(f"--- sample {j + 1}: {prompt}{text.replace(tok.decode([tok.eos_id]), '')}")
    return out


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, DataError, FileNotFoundError, ValueError) as err:  # a missing run, a bad path or spec
        print(f"sample.py: error: {err}", file=sys.stderr)
        sys.exit(2)
