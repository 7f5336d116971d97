"""The one loop: exact resume, DDP == one process, bf16 autocast on CPU, CLI smoke runs of train.py and sample.py."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoalign.checkpoint import load_checkpoint
from train import algo_config, main as train_main
from nanoalign.algos.sft import SFT
from nanoalign.config import load_config
from nanoalign.trainer import lr_at, train

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    with open(path, "w") as f:
        for _ in range(64):
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
            completion = " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def tiny_args(data, out_dir, **kw):
    args = dict(algo="sft", data=data, out_dir=out_dir, init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2,
                n_embd=32, block_size=96, max_len=80, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=2,
                max_steps=6, log_interval=1, dtype="float32", dropout=0.1, seed=3)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def config(*args):
    return load_config(list(args), algo_config)


def losses(out_dir):
    return [json.loads(line)["loss"] for line in open(Path(out_dir) / "metrics.jsonl")]


def test_lr_schedule_warmup_then_cosine(sft_file, tmp_path):
    cfg = config(*tiny_args(sft_file, tmp_path, lr=1.0, min_lr_ratio=0.1, warmup_steps=2, max_steps=12))
    assert lr_at(0, cfg) == 0.5 and lr_at(1, cfg) == 1.0                  # linear warmup: (step + 1) / 2
    assert lr_at(2, cfg) == 1.0 and abs(lr_at(12, cfg) - 0.1) < 1e-12      # cosine from 1.0 down to 0.1
    assert abs(lr_at(7, cfg) - 0.55) < 1e-12                                # halfway: 0.1 + 0.9 * 0.5


def test_resume_is_bitwise_identical(sft_file, tmp_path):
    """6 steps straight == 3 steps + resume + 3 steps (fp32 on CPU, dropout on, so RNG state matters too)."""
    straight = train(config(*tiny_args(sft_file, tmp_path / "a")), SFT)
    halves = tmp_path / "b"
    train(config(*tiny_args(sft_file, halves)), SFT, stop_after=3)
    assert load_checkpoint(halves)["step"] == 3
    train(config(*tiny_args(sft_file, halves, resume=True)), SFT)
    a, b = load_checkpoint(straight)["model"], load_checkpoint(halves)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(straight) == losses(halves)


def test_bf16_autocast_step_close_to_fp32(sft_file, tmp_path):
    fp32 = losses(train(config(*tiny_args(sft_file, tmp_path / "f", max_steps=1, dropout=0.0)), SFT))
    bf16 = losses(train(config(*tiny_args(sft_file, tmp_path / "h", max_steps=1, dropout=0.0, dtype="bfloat16")), SFT))
    assert bf16[0] != fp32[0] and abs(bf16[0] - fp32[0]) / fp32[0] < 2e-2


def test_ddp_two_processes_match_one(sft_file, tmp_path):
    """torchrun --nproc_per_node=2 (gloo) with micro 4 x 2 ranks == 1 process with micro 4 x accumulation 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = tmp_path / "one"
    train(config(*tiny_args(sft_file, one, dropout=0.0)), SFT)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "train.py"),
           *tiny_args(sft_file, two, dropout=0.0)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for a, b in zip(losses(one), losses(two), strict=True):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_cli_smoke_train_and_sample(sft_file, tmp_path):
    out = tmp_path / "cli"
    run = subprocess.run([sys.executable, "train.py", *tiny_args(sft_file, out, max_steps=2)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "kept 64 of 64" in run.stdout and (out / "ckpt.pt").exists()
    ckpt = load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["config"]["algo"] == "sft" and ckpt["tokenizer"] == "bytes"
    run = subprocess.run([sys.executable, "sample.py", f"--ckpt={out}", "--prompt=the film", "--num_samples=2",
                          "--max_new_tokens=8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("--- sample") == 2 and "=== 'the film'" in run.stdout


def test_data_without_init_from_is_an_error(sft_file, tmp_path):
    with pytest.raises(SystemExit, match="init_from"):
        train_main([f"--data={sft_file}", "--algo=sft", f"--out_dir={tmp_path}"])
