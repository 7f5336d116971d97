"""What bench.py and peers.py share: the model shapes and workloads, synthetic data, memory and FLOP counting, and
timed optimizer steps of a registered algorithm, each one trainer.train_step as every training run takes it."""
import contextlib
import dataclasses
import json
import random
import resource
import statistics
import time
from pathlib import Path

import torch

import nanoalign.toy  # noqa: F401  (registers the "gold" scorer online algorithms score with, as train.py does)
from nanoalign.algos import algo_config, get_algorithm
from nanoalign.config import load_config
from nanoalign.loading import apply_lora
from nanoalign.lora import LoRALinear
from nanoalign.model import GPT, GPTConfig, llama_config, set_activation_checkpointing
from nanoalign.tokenizer import get_tokenizer
from nanoalign.trainer import Context, finish_lora, make_optimizer, train_step

MODELS = {  # name: (model keyword arguments, CPU workload, CUDA workload)
    "toy": (dict(arch="gpt2", vocab_size=1024, block_size=128, n_layer=4, n_head=4, n_embd=128),
            dict(prompt=(4, 16), completion=(8, 40), batch=32, micro=8),
            dict(prompt=(4, 16), completion=(8, 40), batch=256, micro=64)),
    "gpt2": (dict(arch="gpt2", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),  # 124M
             dict(prompt=(16, 64), completion=(16, 128), batch=8, micro=4),
             dict(prompt=(64, 256), completion=(64, 256), batch=64, micro=16)),
    "gpt2m": (dict(arch="gpt2", vocab_size=50257, block_size=1024, n_layer=24, n_head=16, n_embd=1024),  # 355M
              dict(prompt=(16, 64), completion=(16, 128), batch=4, micro=2),
              dict(prompt=(64, 256), completion=(64, 256), batch=64, micro=16)),
    "llama": (dict(arch="llama", vocab_size=151936, block_size=1024, n_layer=24, n_head=14, n_kv_head=2,  # 494M,
                   n_embd=896, mlp_hidden=4864, qkv_bias=True, tie_embeddings=True, rope_theta=1e6, norm_eps=1e-6),
              dict(prompt=(16, 48), completion=(16, 80), batch=2, micro=2),  # the Qwen2.5-0.5B shape
              dict(prompt=(64, 256), completion=(64, 256), batch=32, micro=8)),
}
ROLLOUT = dict(cpu=dict(batch=64, prompt=16, new=48), cuda=dict(batch=256, prompt=64, new=192))  # PPO rollout shape
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
SWITCHES = dict(logps="fused", bucket="1", ref_logps="precompute", compile="0", lora="0", ckpt="0",
                decode="auto")  # ablations


def build_model(name, device):
    """A GPT of MODELS[name]'s shape with seed-0 random weights."""
    kw = dict(MODELS[name][0])
    make = llama_config if kw.pop("arch") == "llama" else GPTConfig
    torch.manual_seed(0)
    return GPT(make(**kw)).to(device)


def autocast_for(dtype, device):
    """The zero-argument autocast callable of trainer.Context for "fp32" or "bf16"."""
    if dtype == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def random_text(rng, n):
    """n ASCII characters = n tokens of the bytes tokenizer."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(n))


def write_data(path, fmt, workload, n_rows, seed=0):
    """A JSONL file in data format `fmt` with prompt and completion lengths drawn from workload's (min, max)."""
    rng = random.Random(seed)
    length = lambda key: rng.randint(*workload[key])  # noqa: E731
    with open(path, "w") as f:
        for _ in range(n_rows):
            row = {"prompt": random_text(rng, length("prompt"))}
            if fmt == "preference":
                row["chosen"], row["rejected"] = random_text(rng, length("completion")), random_text(rng, length("completion"))
            elif fmt in ("sft", "binary"):
                row["completion"], row["label"] = random_text(rng, length("completion")), rng.random() < 0.5
            f.write(json.dumps(row) + "\n")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_clock(name, device):
    """"wall" (perf_counter) or "cpu" (the process's CPU seconds; on a CUDA device always wall)."""
    return time.process_time if name == "cpu" and device.type == "cpu" else time.perf_counter


# ------------------------------------------------------------------------------------------ memory
def status_mb(field):
    """VmRSS (current) or VmHWM (peak since start or since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the whole-process peak, in KB


class Memory:
    """CUDA max allocated, or the process's resident set (Linux VmHWM). loaded() marks the end of weight loading:
    load_peak_mb keeps the peak before it, loaded_mb what is held then; peak_mb() is the peak since loaded()."""

    def __init__(self, device):
        self.device, self.load_peak_mb, self.loaded_mb = device, 0.0, 0.0

    def loaded(self):
        if self.device.type == "cuda":
            self.load_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.loaded_mb = torch.cuda.memory_allocated(self.device) / 2**20
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.load_peak_mb = status_mb("VmHWM")
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        self.loaded_mb = status_mb("VmRSS")

    def peak_mb(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return status_mb("VmHWM")


# ------------------------------------------------------------------------------------------ FLOPs and tokens
def linear_params(module, frozen_only=False):
    """N of the FLOP count: weights of the linear layers (a tied head counted once, as the matmul it is; a LoRA
    layer's base weight and its two adapters), without a reward model's unused lm_head (its backbone only gives
    hidden states). frozen_only: only those without gradient (LoRA's base weights)."""
    return sum(m.weight.numel() for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, LoRALinear))
               and not name.endswith("backbone.lm_head") and not (frozen_only and m.weight.requires_grad))


def attention_flops_per_token(model, T):
    c = model.cfg
    return 4 * c.n_layer * c.n_head * c.head_dim * T  # QK^T and AV, forward, full (not causal-halved) T x T


def batch_tokens(batch, pad_id):
    """(tokens trained, their padded length, tokens forwarded without gradient) of one micro-batch."""
    ids = batch["input_ids"]
    trained = batch["attention_mask"].sum() if "attention_mask" in batch else (ids != pad_id).sum()
    no_grad = (batch["kl_input_ids"] != pad_id).sum() if "kl_input_ids" in batch else 0  # KTO's mismatched pairs
    return int(trained), ids.shape[1], int(no_grad)


# ------------------------------------------------------------------------------------------ an algorithm's steps
def wide_bytes_tokenizer():
    """The bytes tokenizer, decoding ids past its 258 as the byte id % 256: a random model with a large vocabulary
    samples such ids, and online algorithms decode their samples for the scorer."""
    tokenizer = get_tokenizer("bytes")
    decode, n = tokenizer.decode, tokenizer.vocab_size
    tokenizer.decode = lambda ids: decode([int(i) % 256 if int(i) >= n else int(i) for i in ids])
    return tokenizer


def switch_args(spec):
    """The train.py keys of the ablation switches: logps (fused, plain), bucket (1, 0), ckpt (activation
    checkpointing 1, 0), and lora (rank r with alpha 2r, as the README's --lora_rank=16 --lora_alpha=32; targets
    from lora_targets or TrainConfig's; 0 = none)."""
    args = [f"--fused_logps={spec['logps'] == 'fused'}", f"--bucket_by_length={spec['bucket'] == '1'}",
            f"--activation_checkpointing={spec.get('ckpt') == '1'}"]
    rank = int(spec.get("lora") or 0)
    if rank:
        args += [f"--lora_rank={rank}", f"--lora_alpha={2 * rank}"]
        args += [f"--lora_targets={spec['lora_targets']}"] if spec.get("lora_targets") else []
    return args


def make_algorithm(spec, device, model, autocast, workdir, workload, data=None):
    """The registered algorithm on synthetic data (or `data`), configured as train.py would configure it; with
    LoRA, adapters go on the policy before the algorithm is built and on its module after, as trainer.train does
    (build_policy, then apply_lora)."""
    algo_cls = get_algorithm(spec["algo"])
    rollout = ROLLOUT[device.type]
    if data is None:
        data = Path(workdir) / "data.jsonl"
        fmt = {"text": "sft", "binary": "preference"}.get(algo_cls.data_format, algo_cls.data_format)  # KTO unpairs
        shape = {**workload, "prompt": (rollout["prompt"],) * 2} if fmt == "prompt" else workload
        write_data(data, fmt, shape, n_rows=max(2 * workload["batch"], rollout["batch"]))
    args = [f"--algo={spec['algo']}", f"--data={data}", f"--batch_size={workload['batch']}",
            f"--micro_batch_size={workload['micro']}", f"--max_len={model.cfg.block_size}",
            f"--max_steps={spec['warmup'] + spec['steps']}", "--init_from=scratch", "--tokenizer=bytes",
            f"--out_dir={workdir}", f"--dtype={DTYPES[spec['dtype']]}", "--dropout=0.0", *switch_args(spec)]
    keys = {f.name for f in dataclasses.fields(algo_cls.Config)} if algo_cls.Config else set()
    online = {"ref_logps": spec["ref_logps"], "reward_model": "gold", "max_new_tokens": rollout["new"],
              "generation_batch_size": rollout["batch"]}
    if spec["algo"] == "ppo":  # PPO's rollout is several minibatches; the others roll out one global batch
        online["rollout_batch_size"] = rollout["batch"]
    args += [f"--{k}={v}" for k, v in online.items() if k in keys]
    cfg = load_config(args, algo_config)
    ctx = Context(device, 0, 1, workload["micro"], workload["batch"] // workload["micro"], autocast,
                  torch.bfloat16 if spec["dtype"] == "bf16" else None)  # as trainer.run builds it
    if cfg.lora_rank:  # random weights stand in for a pretrained base (apply_lora refuses "scratch" in real runs)
        pretrained = dataclasses.replace(cfg, init_from="random weights (benchmark)")
        apply_lora(model, pretrained)
    algo = algo_cls(cfg, model, wide_bytes_tokenizer(), ctx)
    if cfg.lora_rank:
        finish_lora(algo, pretrained)  # a critic or reward trunk the algorithm built; the frozen base in bf16
    return algo, cfg


def timed(batches, clock, device, spent):
    """`batches`, adding the seconds each next() takes (an online algorithm's rollout) to spent[0]."""
    while True:
        sync(device)
        t0 = clock()
        batch = next(batches)
        sync(device)
        spent[0] += clock() - t0
        yield batch


def time_algorithm(spec, device, model, autocast, workdir, workload, data=None, clock=time.perf_counter):
    """Warmup + timed optimizer steps of the registered algorithm, each one trainer.train_step; tokens and FLOPs
    are counted in its on_micro_batch hook. Returns per-step medians; data_s is the time spent in next(batches)."""
    t0 = clock()
    algo, cfg = make_algorithm(spec, device, model, autocast, workdir, workload, data)  # DPO/KTO: reference pass
    setup_s = clock() - t0
    module = set_activation_checkpointing(algo.module.to(device), cfg.activation_checkpointing)  # as trainer.run
    optimizer = make_optimizer(module, cfg, device)
    net = torch.compile(module) if spec["compile"] == "1" else module
    pad_id, N = algo.tokenizer.pad_id, linear_params(module)
    trained_per_token = 6 * N - 2 * linear_params(module, frozen_only=True)  # frozen: no weight gradient (LoRA)
    rows, data_s = [], [0.0]

    def count(batch, metrics):
        trained, T, no_grad = batch_tokens(batch, pad_id)
        row = rows[-1]
        row["tokens"] += trained + no_grad
        row["flops"] += trained * (trained_per_token + 3 * attention_flops_per_token(model, T)) + no_grad * (
            2 * N + attention_flops_per_token(model, T))
        row["real"], row["padded"] = row["real"] + trained, row["padded"] + batch["input_ids"].numel()
        row["response_length"] = float(metrics.get("val/response_length", 0.0))

    batches = timed(algo.batches(0), clock, device, data_s)
    module.train()
    for _ in range(spec["warmup"] + spec["steps"]):
        rows.append(dict(tokens=0, flops=0, real=0, padded=0))
        data_s[0] = 0.0
        sync(device)
        t_start = clock()
        _, _, outcome = train_step(net, module, algo, optimizer, batches, cfg.grad_clip, count)
        sync(device)
        rows[-1].update(step_s=clock() - t_start, data_s=data_s[0])
        if outcome != "stepped":
            raise RuntimeError(f"{spec['algo']}: the update was skipped ({outcome}); the step time would not be a "
                               "full step's")
    timed_rows = rows[spec["warmup"]:]
    median = lambda key: statistics.median(r[key] for r in timed_rows)  # noqa: E731
    trainable = [p for p in module.parameters() if p.requires_grad]
    result = dict(tokens=median("tokens"), step_s=median("step_s"), data_s=median("data_s"), flops=median("flops"),
                  pad=1 - sum(r["real"] for r in timed_rows) / sum(r["padded"] for r in timed_rows), setup_s=setup_s,
                  step_times=[r["step_s"] for r in timed_rows], shape=f"batch={workload['batch']} "
                  f"micro={workload['micro']} prompt={workload['prompt']} completion={workload['completion']}",
                  trainable=sum(p.numel() for p in trainable), optimizer_state_bytes=optimizer_bytes(optimizer),
                  grad_bytes=sum(p.numel() * p.element_size() for p in trainable))  # one gradient per parameter
    if algo.data_format == "prompt":  # online: step 0 began with the rollout (generation, scoring, reference,
        first, rollout = rows[0], ROLLOUT[device.type]  # values); it gets its own row, the updates another
        length = first.get("response_length") or rollout["new"]
        per_token = 2 * (2 * linear_params(algo.policy) + N - linear_params(algo.policy))  # policy, ref, critic
        result["rollout"] = dict(tokens=rollout["batch"] * length, step_s=first["data_s"], data_s=first["data_s"],
                                 pad=0.0, flops=rollout["batch"] * (rollout["prompt"] + length) * per_token)
        result["step_s"] = statistics.median(r["step_s"] - r["data_s"] for r in timed_rows)
    return result


def optimizer_bytes(optimizer):
    """Bytes of the optimizer's state tensors (AdamW: exp_avg, exp_avg_sq and a step count per parameter)."""
    return sum(t.numel() * t.element_size() for per_param in optimizer.state.values() for t in per_param.values()
               if torch.is_tensor(t))
