"""Hugging Face format, one job a file: config.py (config.json <-> GPTConfig), weights.py (safetensors, our module
names, load_hf_model / save_hf_model), tokenizer.py (tokenizer.json -> tiktoken), peft.py (LoRA adapters in PEFT's
format); `python -m nanoalign.hf export` (__main__.py) writes a training checkpoint as an HF model directory.
Reading and writing weights needs the `hf` extra (safetensors)."""
