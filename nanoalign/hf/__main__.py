"""python -m nanoalign.hf export --ckpt=<run> --out=<dir> [--peft]: a nanoalign checkpoint as a Hugging Face model
directory (config.json, safetensors, the tokenizer files), or a LoRA run's adapters alone in PEFT's format."""
import argparse

from nanoalign.hf.peft import export_peft
from nanoalign.hf.weights import MAX_SHARD_BYTES, _dtype, save_hf_model
from nanoalign.loading import load_model


def export_checkpoint(ckpt, out_dir, dtype=None, max_shard_bytes=MAX_SHARD_BYTES):
    """A nanoalign checkpoint (ckpt.pt or its run directory) as an HF model directory."""
    model, tokenizer = load_model(str(ckpt))
    if dtype:
        model = model.to(_dtype(dtype))
    source = tokenizer.spec.removeprefix("hf:") if tokenizer.spec.startswith("hf:") else None
    return save_hf_model(model, out_dir, tokenizer_dir=source, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanoalign.hf", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a nanoalign checkpoint as a Hugging Face model directory")
    export.add_argument("--ckpt", required=True, help="run directory or ckpt.pt")
    export.add_argument("--out", required=True, help="output directory")
    export.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's dtype)")
    export.add_argument("--max_shard_bytes", type=int, default=MAX_SHARD_BYTES)
    export.add_argument("--peft", action="store_true", help="a LoRA run's adapters only, in PEFT's format "
                        "(adapter_config.json + adapter_model.safetensors); its base must be an hf:<dir>")
    args = parser.parse_args(argv)
    out = export_peft(args.ckpt, args.out, args.dtype) if args.peft else \
        export_checkpoint(args.ckpt, args.out, args.dtype, args.max_shard_bytes)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
