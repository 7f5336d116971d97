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
from nanoalign.algos import algo_config
from train import main as train_main
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


@pytest.mark.integration
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


@pytest.mark.integration
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


def records(out_dir):
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def test_eval_runs_on_its_own_schedule_not_only_at_log_steps(sft_file, tmp_path):
    """eval_interval=3, log_interval=4, max_steps=10: eval at steps 3, 6, 9 and 10, logs at 4, 8 and 10."""
    out = train(config(*tiny_args(sft_file, tmp_path, eval_data=sft_file, eval_interval=3, log_interval=4,
                                  max_steps=10, eval_batches=1)), SFT)
    rows = records(out)
    assert [r["step"] for r in rows] == [3, 4, 6, 8, 9, 10]
    assert [r["step"] for r in rows if "eval/nll_loss" in r] == [3, 6, 9, 10]


class NaNAt(SFT):
    """SFT whose loss is NaN from optimizer step `first` (counted in micro-batches) on, for `count` steps."""
    first, count = 2, 10 ** 9

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        step = self.calls // self.ctx.grad_accum
        self.calls += 1
        return (loss * float("nan") if self.first <= step < self.first + self.count else loss), metrics


def test_a_non_finite_step_is_skipped_and_counted_and_the_weights_stay_finite(sft_file, tmp_path):
    class TwoNaNSteps(NaNAt):
        count = 2
    out = train(config(*tiny_args(sft_file, tmp_path, max_steps=6, dropout=0.0)), TwoNaNSteps)
    rows = records(out)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2, 2, 2]
    assert all(torch.isfinite(v).all() for v in load_checkpoint(out)["model"].values())


class NoSignalAfter(SFT):
    """SFT whose rows carry no signal after the first optimizer step: their loss is 0 and has_signal says so."""

    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def has_signal(self, batch):
        return self.calls <= self.ctx.grad_accum  # called after the step's micro-batches ran

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        return (loss if self.calls <= self.ctx.grad_accum else loss * 0.0), metrics


def test_a_step_without_signal_is_not_taken_so_momentum_does_not_move_the_weights(sft_file, tmp_path):
    """After step 1 every row has zero loss. AdamW's momentum alone would still move the weights on the zero
    gradients (and weight decay shrink them); the trainer does not step, so the final weights are step 1's."""
    args = tiny_args(sft_file, tmp_path / "a", max_steps=4, dropout=0.0, weight_decay=0.1)
    after_one = load_checkpoint(train(config(*args), NoSignalAfter, stop_after=1))["model"]
    out = train(config(*tiny_args(sft_file, tmp_path / "b", max_steps=4, dropout=0.0, weight_decay=0.1)), NoSignalAfter)
    assert [r["no_signal_steps"] for r in records(out)] == [0, 1, 2, 3]
    assert [r["skipped_steps"] for r in records(out)] == [0, 0, 0, 0]
    final = load_checkpoint(out)["model"]
    assert all(torch.equal(final[k], after_one[k]) for k in final)


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(sft_file, tmp_path):
    """NaN from step 3 on: steps 3-5 are skipped, the run stops at step 5; the checkpoints written every step hold the
    weights of step 2, the last update."""
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had a non-finite loss"):
        train(config(*tiny_args(sft_file, tmp_path, max_steps=8, dropout=0.0, ckpt_interval=1)), NaNAt)
    saved = load_checkpoint(tmp_path)
    reference = train(config(*tiny_args(sft_file, tmp_path / "two", max_steps=2, dropout=0.0, min_lr_ratio=1.0,
                                        warmup_steps=2)), SFT)
    assert saved["step"] == 4 and all(torch.isfinite(v).all() for v in saved["model"].values())
    assert all(torch.equal(saved["model"][k], v) for k, v in load_checkpoint(reference)["model"].items())


def test_non_finite_weights_are_never_saved(sft_file, tmp_path):
    class Poison(SFT):
        def finish(self, model):
            with torch.no_grad():
                next(self.module.parameters()).fill_(float("inf"))
    train(config(*tiny_args(sft_file, tmp_path, max_steps=2, dropout=0.0)), SFT)
    with pytest.raises(RuntimeError, match="not finite"):
        train(config(*tiny_args(sft_file, tmp_path, max_steps=2, dropout=0.0, overwrite=True)), Poison)
    assert all(torch.isfinite(v).all() for v in load_checkpoint(tmp_path)["model"].values())


def test_the_micro_batch_is_derived_from_the_global_batch_and_the_world_size():
    from nanoalign.config import ConfigError
    from nanoalign.trainer import split_batch
    assert split_batch(32, 8, 1) == (8, 4)
    assert split_batch(32, 8, 8) == (4, 1)   # the README's 8-rank command: 4 examples per rank, no accumulation
    assert split_batch(48, 8, 4) == (6, 2)   # 12 per rank: the largest micro-batch <= 8 that divides 12
    with pytest.raises(ConfigError, match="does not split evenly over 3 ranks"):
        split_batch(32, 8, 3)
    with pytest.raises(ConfigError, match="must be >= 1"):
        split_batch(32, 0, 1)


def test_help_lists_every_key_with_its_default_and_comment(capsys):
    train_main(["--help"])
    out = capsys.readouterr().out
    assert "--lr=0.0001" in out and "peak learning rate" in out and " optimisation:" in out
    train_main(["--algo=ppo", "-h"])
    out = capsys.readouterr().out
    assert "--algo=ppo keys:" in out and "--epochs=4" in out and "GAE lambda (D5)" in out
    train_main(["--algo=ipo", "--help"])
    assert "--loss_type='ipo'" in capsys.readouterr().out  # a variant shows its own defaults


@pytest.mark.integration
def test_a_user_error_is_one_line_and_exit_code_2(sft_file, tmp_path):
    run = subprocess.run([sys.executable, "train.py", "--lr=abc"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "train.py: error: config key 'lr' from the command line: expected float, got 'abc'"]


def test_a_run_prints_its_evals_and_ends_with_one_summary_line(sft_file, tmp_path, capsys):
    train(config(*tiny_args(sft_file, tmp_path, eval_data=sft_file, eval_interval=2, max_steps=3, eval_batches=1)), SFT)
    out = capsys.readouterr()
    text = out.out + out.err  # tqdm.write goes to the bar's stream
    assert "step 2: eval/nll_loss" in text and "step 3: eval/nll_loss" in text
    last = out.out.strip().splitlines()[-1]
    assert last.startswith("sft: 3 steps in") and "loss " in last and f"checkpoint {tmp_path / 'ckpt.pt'}" in last


def test_plot_draws_the_curves_of_two_runs(sft_file, tmp_path):
    pytest.importorskip("matplotlib")
    from nanoalign.plot import main as plot_main, panels, read_metrics
    a = train(config(*tiny_args(sft_file, tmp_path / "a", eval_data=sft_file, eval_interval=2, eval_batches=1)), SFT)
    b = train(config(*tiny_args(sft_file, tmp_path / "b", lr=1e-2)), SFT)
    names = panels([read_metrics(a), read_metrics(b)])
    assert names[:2] == ["loss", "nll_loss"] and "eval/nll_loss" in names and not any(n.startswith("time/") for n in names)
    plot_main([str(a), str(b), f"--out={tmp_path / 'c.png'}"])
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "c.png").stat().st_size > 5000
    with pytest.raises(FileNotFoundError, match="no metrics"):
        plot_main([str(tmp_path / "nothing")])


def test_report_to_tensorboard_writes_the_logged_rows_as_events(sft_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = train(config(*tiny_args(sft_file, tmp_path, report_to="tensorboard", max_steps=3)), SFT)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
    assert [round(e.value, 5) for e in loss] == [round(r["loss"], 5) for r in records(out)]
    with pytest.raises(ValueError, match="unknown \\['tensorbord'\\]"):
        train(config(*tiny_args(sft_file, tmp_path / "typo", report_to="tensorbord")), SFT)
    assert not (tmp_path / "typo").exists()  # refused before anything was written


def test_report_to_wandb_offline_writes_a_run_folder(sft_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = train(config(*tiny_args(sft_file, tmp_path, report_to="wandb", max_steps=2)), SFT)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the run's event log, ready for `wandb sync`
