"""Fault tests: what a run does when it is rerun, killed, signalled, run twice at once, diverges or gets bad input.
Each runs `python train.py` as a user would (a subprocess on tiny data, a 1-layer model from scratch, CPU), so they
sit behind the `integration` marker, which CI runs; docs/reliability.md states the guarantees they check."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nanoalign.checkpoint import load_checkpoint

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))),
             "completion": " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))} for _ in range(64)]
    rows.append({"prompt": "x" * 100, "completion": " " + "y" * 20})  # 121 tokens: longer than block_size 64
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(data, out_dir, **kw):
    values = dict(algo="sft", data=data, out_dir=out_dir, init_from="scratch", tokenizer="bytes", n_layer=1, n_head=2,
                  n_embd=32, block_size=64, max_len=128, batch_size=8, micro_batch_size=4, lr=3e-3, warmup_steps=1,
                  max_steps=4, log_interval=1, dtype="float32", seed=3, ckpt_interval=1)
    values.update(kw)
    return [f"--{k}={v}" for k, v in values.items()]


def train(*argv, wait=True, env=None):
    cmd = [sys.executable, "train.py", *map(str, argv)]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def rows(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_rerun_is_refused_and_the_old_run_is_intact_until_told_to_overwrite(data, tmp_path):
    first = train(*args(data, tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    assert "kept 65 of 65; prompt cut from the left in 1" in first.stdout  # the 121-token row was fitted to the 64-position model, and counted
    before = (tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()
    again = train(*args(data, tmp_path, lr=1e-2))
    assert again.returncode == 2 and "already holds a run (ckpt.pt): pass --resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1  # one line, no traceback
    assert ((tmp_path / "ckpt.pt").read_bytes(), (tmp_path / "metrics.jsonl").read_text()) == before
    assert train(*args(data, tmp_path, lr=1e-2, overwrite=True)).returncode == 0
    assert load_checkpoint(tmp_path)["config"]["lr"] == 1e-2 and [r["step"] for r in rows(tmp_path)] == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_and_resume_under_another_model_are_errors(data, tmp_path):
    missing = train(*args(data, tmp_path / "none", resume=True))
    assert missing.returncode == 2 and "--resume: there is no checkpoint" in missing.stderr
    assert train(*args(data, tmp_path / "run")).returncode == 0
    other = train(*args(data, tmp_path / "run", resume=True, max_steps=6, n_embd=64))
    assert other.returncode == 2 and "cannot resume" in other.stderr and "model n_embd: checkpoint 32" in other.stderr


def test_kill_9_then_resume_finishes_with_every_step_logged_once(data, tmp_path):
    run = train(*args(data, tmp_path, max_steps=400), wait=False)
    while not (tmp_path / "ckpt.pt").exists() and run.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    run.send_signal(signal.SIGKILL)
    run.communicate()
    saved = load_checkpoint(tmp_path)["step"]
    assert 0 < saved < 400
    resumed = train(*args(data, tmp_path, max_steps=400, resume=True))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not list(tmp_path.glob("*.tmp"))  # a temp file of the killed writer is removed by the next save
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 401))  # rows past the checkpoint were cut back


def test_sigterm_saves_then_stops_and_resume_continues(data, tmp_path):
    run = train(*args(data, tmp_path, max_steps=100000, ckpt_interval=0), wait=False)
    while not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text():
        time.sleep(0.05)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode != 0 and "stopped by SIGTERM after step" in err
    step = load_checkpoint(tmp_path)["step"]  # ckpt_interval=0: the signal's save is the only one
    assert step > 0 and rows(tmp_path)[-1]["step"] == step
    resumed = train(*args(data, tmp_path, max_steps=step + 2, resume=True, ckpt_interval=0))
    assert resumed.returncode == 0 and load_checkpoint(tmp_path)["step"] == step + 2


def test_two_runs_on_one_out_dir_the_second_is_refused(data, tmp_path):
    first = train(*args(data, tmp_path, max_steps=100000, ckpt_interval=0), wait=False)
    while not (tmp_path / ".lock").exists() or not (tmp_path / ".lock").read_text():
        time.sleep(0.05)
    second = train(*args(data, tmp_path, overwrite=True))
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2 and f"in use by another run (pid {first.pid})" in second.stderr
    assert train(*args(data, tmp_path, overwrite=True)).returncode == 0  # the lock of a finished run is free


def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_nan(data, tmp_path):
    run = train(*args(data, tmp_path, lr=1e6, max_steps=50))
    assert "non-finite" in run.stdout + run.stderr
    assert run.returncode != 0
    ckpt = load_checkpoint(tmp_path)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_the_toy_pipeline_never_deletes_a_folder_it_did_not_make(tmp_path):
    corpus = tmp_path / "toy" / "corpus"
    corpus.mkdir(parents=True)
    (corpus / "my_notes.txt").write_text("keep me")
    env = {**os.environ, "NANOALIGN_TOY_DIR": str(tmp_path / "toy"), "NANOALIGN_TOY_RECIPE": "tiny"}
    run = train("--algo=sft", f"--out_dir={tmp_path / 'out'}", env=env)
    assert run.returncode == 2 and "the toy pipeline did not make" in run.stderr
    assert (corpus / "my_notes.txt").read_text() == "keep me"
