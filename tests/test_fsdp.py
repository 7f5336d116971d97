"""FSDP2 (--fsdp=true) on 2 CPU processes (gloo) against DDP on the same 2 processes: the same losses and metrics
within fp32 rounding, the same ckpt.pt (keys, weights, optimizer numbering and state), exact resume, LoRA, a
separate critic (PPO), bf16 mixed precision with fp32 checkpoints. Marked integration: each run is a torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanoalign.algos import algo_config
from nanoalign.checkpoint import load_checkpoint
from nanoalign.config import ConfigError, load_config
from nanoalign.loading import load_model
from nanoalign.model import GPT, GPTConfig
from nanoalign.trainer import train
from nanoalign.algos.sft import SFT

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a film plot was good bad very not really great dull and but acting music".split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import random
    rng = random.Random(0)
    text = lambda a, b: " ".join(rng.choice(WORDS) for _ in range(rng.randint(a, b)))  # noqa: E731
    d = tmp_path_factory.mktemp("fsdp")
    rows = {"sft": lambda: {"prompt": text(1, 4), "completion": " " + text(2, 6)},
            "pref": lambda: {"prompt": text(1, 4), "chosen": " " + text(2, 6), "rejected": " " + text(2, 6)},
            "prompts": lambda: {"prompt": text(1, 4)}}
    for name, row in rows.items():
        (d / f"{name}.jsonl").write_text("".join(json.dumps(row()) + "\n" for _ in range(64)))
    return d


def args(files, out, **kw):
    base = dict(algo="sft", data=files / "sft.jsonl", out_dir=out, init_from="scratch", tokenizer="bytes", n_layer=2,
                n_head=2, n_embd=32, block_size=96, max_len=80, batch_size=8, micro_batch_size=2, lr=3e-3,
                warmup_steps=2, max_steps=4, log_interval=1, dtype="float32", seed=3)
    base.update(kw)
    return [f"--{k}={v}" for k, v in base.items()]


def torchrun(argv, stop_after=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "torchrun_train.py"), *argv, *([f"--stop_after={stop_after}"] if stop_after else [])]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in open(Path(out) / "metrics.jsonl")]


def assert_close_rows(a, b, rtol):
    assert len(a) == len(b) and all(x.keys() == y.keys() for x, y in zip(a, b))
    for x, y in zip(a, b):
        for k in x:
            assert abs(x[k] - y[k]) <= rtol * abs(x[k]) + 1e-6, (x["step"], k, x[k], y[k])


def assert_same_checkpoint(a, b, atol):
    a, b = load_checkpoint(a), load_checkpoint(b)
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=atol, msg=k)
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]  # torch.optim's numbering
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for i, state in a["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(b["optimizer"]["state"][i][k], v, rtol=1e-4, atol=atol, msg=f"{i} {k}")


RUNS = {  # name: the keys of one tiny run of each kind of module FSDP shards
    "sft": dict(),
    "dpo": dict(algo="dpo", data="pref.jsonl"),
    "ppo (separate critic)": dict(algo="ppo", data="prompts.jsonl", reward_model="gold", max_new_tokens=8),
    "grpo (reference copy)": dict(algo="grpo", data="prompts.jsonl", reward_model="gold", max_new_tokens=8,
                                  batch_size=16, micro_batch_size=4),
}


@pytest.mark.integration
def test_generate_under_fsdp_runs_the_same_steps_on_every_rank(tmp_path):
    """Every decode step all-gathers the shards, so ranks that stop at different steps would desynchronise the
    collectives (rank 0 then read rank 1's next gather as its own forward's). Rank 0's rows stop at EOS at once and
    it asks for 6 tokens, rank 1 asks for 10 and never stops: both run 6 steps, and each rank's tokens (up to EOS)
    and a forward after generate equal the unsharded model's."""
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "tests" / "torchrun_generate.py"), str(tmp_path)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(got["tokens"][0]) == 6                                     # the fewest max_new_tokens asked
        plain = model.generate(got["prompts"], 6, temperature=0.0, eos_id=got["eos_id"])
        for i in range(len(got["prompts"])):
            n = int(sum(got["mask"][i]))
            assert n == int(plain.mask[i].sum()) and got["tokens"][i][:n] == plain.tokens[i, :n].tolist()
        with torch.no_grad():
            torch.testing.assert_close(torch.tensor(got["after"]), model(torch.tensor([[1, 2, 3]]))[0, -1])
    assert sum(json.loads((tmp_path / "rank0.json").read_text())["mask"][0]) == 1  # rank 0's first row: EOS at once


@pytest.mark.integration
@pytest.mark.parametrize("name", RUNS)
def test_fsdp_matches_ddp_losses_and_writes_the_same_checkpoint(files, tmp_path, name):
    kw = dict(RUNS[name])
    if "data" in kw:
        kw["data"] = files / kw["data"]
    torchrun(args(files, tmp_path / "ddp", **kw))
    torchrun(args(files, tmp_path / "fsdp", fsdp="true", **kw))
    assert_close_rows(rows(tmp_path / "ddp"), rows(tmp_path / "fsdp"), rtol=1e-5)
    assert_same_checkpoint(tmp_path / "ddp", tmp_path / "fsdp", atol=1e-5)


@pytest.mark.integration
def test_fsdp_lora_matches_ddp_and_its_checkpoint_loads_like_any_other(files, tmp_path):
    """LoRA under FSDP (pi_ref = the sharded policy with its adapters off): DDP's losses and adapters; the
    checkpoint loads through load_model (what export and sample.py use) with DDP's logits."""
    torchrun(args(files, tmp_path / "base", max_steps=2))
    kw = dict(algo="dpo", data=files / "pref.jsonl", init_from=f"ckpt:{tmp_path / 'base'}", lora_rank=4,
              ref_logps="live")
    torchrun(args(files, tmp_path / "ddp", **kw))
    torchrun(args(files, tmp_path / "fsdp", fsdp="true", **kw))
    assert_close_rows(rows(tmp_path / "ddp"), rows(tmp_path / "fsdp"), rtol=1e-5)
    assert_same_checkpoint(tmp_path / "ddp", tmp_path / "fsdp", atol=1e-5)
    assert "lora" in load_checkpoint(tmp_path / "fsdp")
    x = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ddp, fsdp = (load_model(f"ckpt:{tmp_path / d}")[0].eval()(x) for d in ("ddp", "fsdp"))
    torch.testing.assert_close(fsdp, ddp, rtol=0, atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("fsdp", ["true", "false"])
def test_two_rank_resume_is_exact(files, tmp_path, fsdp):
    """Stopped after step 2 and resumed to step 4 == 4 steps straight, bitwise, under FSDP (the gathered optimizer
    state re-sharded) and DDP; with dropout, so each rank's own RNG state must come back."""
    kw = dict(algo="dpo", data=files / "pref.jsonl", fsdp=fsdp, dropout=0.1)
    torchrun(args(files, tmp_path / "straight", **kw))
    torchrun(args(files, tmp_path / "resumed", **kw), stop_after=2)
    torchrun(args(files, tmp_path / "resumed", resume="true", **kw))
    assert rows(tmp_path / "straight") == rows(tmp_path / "resumed")
    a, b = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "resumed")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.integration
def test_fsdp_bf16_tracks_fp32_and_saves_fp32_master_weights(files, tmp_path):
    """bf16 mixed precision (parameters gathered in bf16, gradients reduced in fp32): losses within 1% of the fp32
    run's; the checkpoint's weights and optimizer state are fp32."""
    kw = dict(algo="dpo", data=files / "pref.jsonl", fsdp="true")
    torchrun(args(files, tmp_path / "fp32", **kw))
    torchrun(args(files, tmp_path / "bf16", **{**kw, "dtype": "bfloat16"}))
    for a, b in zip(rows(tmp_path / "fp32"), rows(tmp_path / "bf16"), strict=True):
        assert abs(a["loss"] - b["loss"]) <= 0.01 * a["loss"]
    ckpt = load_checkpoint(tmp_path / "bf16")
    assert {v.dtype for v in ckpt["model"].values()} == {torch.float32}
    assert {v.dtype for s in ckpt["optimizer"]["state"].values() for v in s.values()} == {torch.float32}


def test_fsdp_without_torchrun_is_a_clear_error(files, tmp_path):
    with pytest.raises(ConfigError, match="torchrun"):
        train(load_config(args(files, tmp_path, fsdp="true"), algo_config), SFT)
