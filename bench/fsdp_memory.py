"""Peak memory per rank, DDP vs FSDP2, for one train.py command on N CPU processes (gloo).

    python bench/fsdp_memory.py                      # SFT, a GPT-2-124M-shaped model (byte vocabulary), 2 ranks
    python bench/fsdp_memory.py --nproc=2 --algo=dpo --data=prefs.jsonl ...   # any train.py keys

Each mode runs `torchrun --nproc_per_node=N` on this file, which trains with nanoalign's loop and reads each rank's
peak resident set (VmHWM) twice: just before the first checkpoint is built (the training peak) and at the end
(which adds rank 0's gather of the full state for ckpt.pt). glibc's allocator keeps freed memory mapped unless told
otherwise, which hides what is live; both modes run with MALLOC_ARENA_MAX=1 MALLOC_TRIM_THRESHOLD_=0 so the resident
set follows the live tensors. Linux only (/proc/self/status).
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch.distributed as dist  # noqa: E402

import nanoalign.trainer as trainer  # noqa: E402
from nanoalign.algos import algo_config, get_algorithm  # noqa: E402
from nanoalign.config import load_config  # noqa: E402

MODEL = ["--init_from=scratch", "--tokenizer=bytes", "--n_layer=12", "--n_head=12", "--n_embd=768",
         "--block_size=128", "--max_len=96", "--batch_size=8", "--micro_batch_size=4", "--max_steps=3",
         "--dtype=float32", "--ckpt_interval=0", "--log_interval=1"]


def peak_mb():
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) // 1024


def child(argv):
    """Under torchrun: train, printing this rank's peak before the first checkpoint and at the end."""
    seen = []

    def before_save(real):
        def wrapped(*args, **kwargs):
            if not seen:
                seen.append(peak_mb())
            return real(*args, **kwargs)
        return wrapped
    trainer.full_state = before_save(trainer.full_state)  # the first thing a save calls, in either mode
    trainer.trainable_state = before_save(trainer.trainable_state)
    cfg = load_config(argv, algo_config)
    trainer.train(cfg, get_algorithm(cfg.algo))
    print(json.dumps({"rank": dist.get_rank(), "train_peak_mb": seen[0], "end_peak_mb": peak_mb()}), flush=True)
    dist.destroy_process_group()


def write_sft_data(path):
    words = "the a film plot was good bad very not really great dull and but acting music".split()
    rows = [{"prompt": " ".join(words[(i + k) % len(words)] for k in range(3)),
             "completion": " " + " ".join(words[(i * 7 + k) % len(words)] for k in range(6))} for i in range(64)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(argv):
    nproc = next((a.split("=", 1)[1] for a in argv if a.startswith("--nproc=")), "2")
    given = [a for a in argv if not a.startswith("--nproc=")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"}
    with tempfile.TemporaryDirectory() as work:
        if not any(a.startswith("--data=") for a in given):
            write_sft_data(Path(work) / "sft.jsonl")
            given = ["--algo=sft", f"--data={Path(work) / 'sft.jsonl'}", *given]
        print(f"{nproc} ranks: {' '.join(MODEL + given)}")
        print("| mode | rank | peak MB while training | peak MB with the final checkpoint |\n|---|---|---|---|")
        for mode in ("ddp", "fsdp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   __file__, "--child", *MODEL, *given, f"--out_dir={Path(work) / mode}", f"--fsdp={mode == 'fsdp'}"]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"{mode} failed:\n{run.stderr[-3000:]}")
            rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith('{"rank"')]
            for r in sorted(rows, key=lambda r: r["rank"]):
                print(f"| {mode} | {r['rank']} | {r['train_peak_mb']} | {r['end_peak_mb']} |", flush=True)


if __name__ == "__main__":
    if "--child" in sys.argv:
        child([a for a in sys.argv[1:] if a != "--child"])
    else:
        main(sys.argv[1:])
