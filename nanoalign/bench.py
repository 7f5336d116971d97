"""Speed and memory benchmark: python -m nanoalign.bench [--key=a,b ...]

For each device x model x dtype x algorithm (x ablation switches) it runs a few optimizer steps of the real
Algorithm (its batches() and loss(), the trainer's step: autocast, backward, clipping, AdamW) on random weights and
synthetic data, each config in a FRESH subprocess so peak memory (CUDA max allocated, or the process's peak RSS on
CPU) is that config's own. It prints tokens/s, seconds per step (split into data/rollout time and update time),
peak memory, and model-FLOPs utilisation against a matmul peak measured on the same device in the same dtype.

    python -m nanoalign.bench                                 # everything (slow on a CPU: minutes per large model)
    python -m nanoalign.bench --algos=dpo,sft --models=toy,gpt2 --dtypes=bf16
    python -m nanoalign.bench --algos=dpo --models=gpt2 --logps=fused,plain --bucket=1,0   # the ablations
    python -m nanoalign.bench --algos=dpo,rm --models=gpt2 --lora=0,16 --ref_logps=precompute,live  # full vs LoRA
    python -m nanoalign.bench --peers                         # vs TRL and transformers (nanoalign/bench_peers.py)

Keys (comma lists): algos (sft, dpo, kto, orpo, rm, ppo, generate, or any registry name), models (toy, gpt2,
gpt2m, llama), dtypes (fp32, bf16), devices (cpu, cuda; default both where available), logps (fused = batch_logps,
plain = batch_logps_plain), bucket (1 = length-bucketed micro-batches, 0 = plain order), ref_logps (precompute,
live; only for algorithms that have the key), compile (0, 1), lora (0 = full fine-tuning, r = LoRA rank r with
alpha 2r, as train.py's --lora_rank / --lora_alpha; not for generate); scalars: steps, warmup, repeats (runs of
each config; the median is shown), json (path), threads (torch.set_num_threads in each run; default torch's own),
clock (wall, or cpu = the process's CPU seconds: steadier than wall time on a machine shared with other jobs, and
equal to it on an idle one with threads=1), lora_targets (default: TrainConfig's, every attention projection).
Memory: "peak MB" is the whole process (CUDA max allocated, or peak RSS: libraries, weights and the run); "run MB"
is the peak growth above the state right after the weights were built (the peak is reset there), i.e. what the
run adds: data, a reference copy or pass, optimizer state, gradients, activations; "opt+grad MB" is counted from
the tensors after the first step (AdamW keeps 2 fp32 tensors per trainable parameter, plus a gradient each).
With lora > 0 a ratio line per algorithm compares each LoRA row with the full row of the same other switches.
Tokens are the non-padding tokens of every sequence the step runs through the policy; model FLOPs follow
nanoGPT / PaLM: 6 N + 12 L d T per trained token (N = parameters of the linear layers, the tied head counted
once as a matmul; a frozen weight, as LoRA's base, counts 4 instead of 6: no weight gradient), 2 N + 4 L d T per
token forwarded without gradient (KTO's mismatched pairs, a live reference).
Generation counts 2 N + 4 L d T per prompt and generated token. Online algorithms (ppo, grpo, rloo, ...) score with
the "gold" scorer and get two rows: the rollout (generation, scoring, reference and values, FLOPs approximate) and
the update steps. Algorithms not in the registry are skipped with a note; a config that fails gets a row saying why.
The CUDA paths (synchronize, max_memory_allocated, larger workloads) have not been run on a GPU yet.
"""
import contextlib
import dataclasses
import itertools
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

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
DEFAULTS = dict(algos="sft,rm,dpo,kto,orpo,ppo,generate", models="toy,gpt2,llama", dtypes="fp32,bf16", devices="",
                logps="fused", bucket="1", ref_logps="precompute", compile="0", lora="0", steps="", warmup="",
                repeats="1", json="", threads="", clock="wall", lora_targets="")
SWITCHES = ("logps", "bucket", "ref_logps", "compile", "lora")  # the ablation keys, one product of their values


# ------------------------------------------------------------------------------------------ one config (child)
def build_model(name, device):
    from nanoalign.model import GPT, GPTConfig, llama_config
    kw = dict(MODELS[name][0])
    make = llama_config if kw.pop("arch") == "llama" else GPTConfig
    torch.manual_seed(0)
    return GPT(make(**kw)).to(device)


def linear_params(module, frozen_only=False):
    """N of the FLOP count: weights of the linear layers (a tied head counted once, as the matmul it is; a LoRA
    layer's base weight and its two adapters), without a reward model's unused lm_head (its backbone only gives
    hidden states). frozen_only: only those without gradient (LoRA's base weights)."""
    from nanoalign.lora import LoRALinear
    return sum(m.weight.numel() for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, LoRALinear))
               and not name.endswith("backbone.lm_head") and not (frozen_only and m.weight.requires_grad))


def random_text(rng, n):
    """n ASCII characters = n tokens of the bytes tokenizer."""
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(n))


def write_data(path, fmt, workload, n_rows, seed=0):
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


clock = time.perf_counter  # run_one switches it to time.process_time for --clock=cpu


def status_mb(field):
    """VmRSS (current) or VmHWM (peak since start or since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: the whole-process peak, in KB


def reset_peak(device):
    """Start measuring the run's own peak: -> (peak so far in MB, memory in use now in MB)."""
    if device.type == "cuda":
        peak, now = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**20, now / 2**20
    peak, now = status_mb("VmHWM"), status_mb("VmRSS")
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    return peak, now


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


def matmul_peak(device, dtype, n=None, repeats=10):
    """Best GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype`: the MFU denominator."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        best = min(best, clock() - t0)
    return 2 * n ** 3 / best / 1e9


def attention_flops_per_token(model, T):
    c = model.cfg
    return 4 * c.n_layer * c.n_head * c.head_dim * T  # QK^T and AV, forward, full (not causal-halved) T x T


def bench_generate(spec, device, model, autocast):
    """The PPO rollout's core: generate() with sampling on a ragged-free batch of prompts, timed per call."""
    shape = ROLLOUT[device.type]
    g = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(0, 256, (shape["batch"], shape["prompt"]), generator=g, device=device).tolist()
    model.eval()
    times = []
    for i in range(spec["warmup"] + spec["steps"]):
        sync(device)
        t0 = clock()
        with autocast():
            out = model.generate(prompts, shape["new"], temperature=1.0, eos_id=None, generator=g)
        sync(device)
        if i >= spec["warmup"]:
            times.append(clock() - t0)
    new_tokens = int(out.mask.sum())
    N, T = linear_params(model), shape["prompt"] + shape["new"]
    flops = (shape["batch"] * shape["prompt"] + new_tokens) * (2 * N + attention_flops_per_token(model, T / 2))
    return dict(tokens=new_tokens, step_s=statistics.median(times), data_s=0.0, flops=flops,
                shape=f"B={shape['batch']} P={shape['prompt']} new={shape['new']}")


def batch_tokens(batch, pad_id):
    """(tokens trained, their padded length, tokens forwarded without gradient) of one micro-batch."""
    ids = batch["input_ids"]
    trained = batch["attention_mask"].sum() if "attention_mask" in batch else (ids != pad_id).sum()
    no_grad = (batch["kl_input_ids"] != pad_id).sum() if "kl_input_ids" in batch else 0  # KTO's mismatched pairs
    return int(trained), ids.shape[1], int(no_grad)


def wide_bytes_tokenizer():
    """The bytes tokenizer, decoding ids past its 258 as the byte id % 256: a random model with a large vocabulary
    samples such ids, and online algorithms decode their samples for the scorer."""
    from nanoalign.tokenizer import get_tokenizer
    tokenizer = get_tokenizer("bytes")
    decode, n = tokenizer.decode, tokenizer.vocab_size
    tokenizer.decode = lambda ids: decode([int(i) % 256 if int(i) >= n else int(i) for i in ids])
    return tokenizer


def lora_args(spec):
    """The train.py keys of the lora ablation: rank r with alpha 2r (the README's --lora_rank=16 --lora_alpha=32),
    targets from --lora_targets or TrainConfig's default; no keys for 0 (full fine-tuning)."""
    rank = int(spec.get("lora") or 0)
    if not rank:
        return []
    targets = [f"--lora_targets={spec['lora_targets']}"] if spec.get("lora_targets") else []
    return [f"--lora_rank={rank}", f"--lora_alpha={2 * rank}", *targets]


def make_algorithm(spec, device, model, autocast, workdir, workload, data=None):
    """The registered algorithm on synthetic data (or `data`), configured as train.py would configure it; with
    LoRA, adapters go on the policy before the algorithm is built and on its module after, as trainer.train does."""
    from nanoalign.algos import get_algorithm, variant_defaults
    from nanoalign.config import load_config
    from nanoalign.loading import apply_lora
    from nanoalign.trainer import Context
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
            f"--out_dir={workdir}", f"--dtype={DTYPES[spec['dtype']]}", "--dropout=0.0", *lora_args(spec),
            f"--fused_logps={spec.get('logps', 'fused') == 'fused'}", f"--bucket_by_length={spec.get('bucket', '1') == '1'}"]
    keys = {f.name for f in dataclasses.fields(algo_cls.Config)} if algo_cls.Config else set()
    online = {"ref_logps": spec["ref_logps"], "reward_model": "gold", "rollout_batch_size": rollout["batch"],
              "max_new_tokens": rollout["new"], "rollout_micro_batch": rollout["batch"],
              "generation_batch_size": rollout["batch"]}
    args += [f"--{k}={v}" for k, v in online.items() if k in keys]
    cfg = load_config(args, lambda name: get_algorithm(name).Config, overrides=variant_defaults(spec["algo"]))
    ctx = Context(device, 0, 1, workload["micro"], workload["batch"] // workload["micro"], autocast)
    if cfg.lora_rank:  # random weights stand in for a pretrained base (apply_lora refuses "scratch" in real runs)
        pretrained = dataclasses.replace(cfg, init_from="random weights (benchmark)")
        apply_lora(model, pretrained)
    algo = algo_cls(cfg, model, wide_bytes_tokenizer(), ctx)
    if cfg.lora_rank:
        apply_lora(algo.module, pretrained)  # a critic or reward trunk the algorithm built
    return algo, cfg


def bench_algorithm(spec, device, model, autocast, workdir, workload=None, data=None):
    """Warmup + timed optimizer steps of the registered algorithm, each exactly as trainer.train runs a step.
    Returns per-step medians; data_s is the time spent in next(batches) (an online algorithm's rollout)."""
    from nanoalign.trainer import make_optimizer, to_device
    workload = workload or MODELS[spec["model"]][1 if device.type == "cpu" else 2]
    t0 = clock()
    algo, cfg = make_algorithm(spec, device, model, autocast, workdir, workload, data)  # DPO/KTO: reference pass
    setup_s = clock() - t0
    module = algo.module.to(device)
    optimizer = make_optimizer(module, cfg, device)
    net = torch.compile(module) if spec["compile"] == "1" else module
    batches, pad_id, N = algo.batches(0), algo.tokenizer.pad_id, linear_params(module)
    trained_per_token = 6 * N - 2 * linear_params(module, frozen_only=True)  # frozen: no weight gradient (LoRA)
    module.train()
    rows = []
    for step in range(spec["warmup"] + spec["steps"]):
        row = dict(tokens=0, flops=0, real=0, padded=0, data_s=0.0)
        sync(device)
        t_start = clock()
        for _ in range(algo.ctx.grad_accum):
            t0 = clock()
            batch = to_device(next(batches), device)  # online algorithms roll out here
            sync(device)
            row["data_s"] += clock() - t0
            with autocast():
                loss, metrics = algo.loss(net, batch)
            (loss / algo.ctx.grad_accum).backward()
            trained, T, no_grad = batch_tokens(batch, pad_id)
            row["tokens"] += trained + no_grad
            row["flops"] += trained * (trained_per_token + 3 * attention_flops_per_token(model, T)) + no_grad * (
                2 * N + attention_flops_per_token(model, T))
            row["real"], row["padded"] = row["real"] + trained, row["padded"] + batch["input_ids"].numel()
            row["response_length"] = float(metrics.get("val/response_length", 0.0))
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        if step == 0:  # what full fine-tuning pays per trainable parameter and LoRA does not
            state_bytes, grad_bytes = optimizer_bytes(optimizer)
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        rows.append({**row, "step_s": clock() - t_start})
    timed = rows[spec["warmup"]:]
    median = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    result = dict(tokens=median("tokens"), step_s=median("step_s"), data_s=median("data_s"), flops=median("flops"),
                  pad=1 - sum(r["real"] for r in timed) / sum(r["padded"] for r in timed), setup_s=setup_s,
                  step_times=[r["step_s"] for r in timed], shape=f"batch={workload['batch']} micro={workload['micro']} "
                  f"prompt={workload['prompt']} completion={workload['completion']}",
                  trainable=sum(p.numel() for p in module.parameters() if p.requires_grad),
                  optimizer_state_bytes=state_bytes, grad_bytes=grad_bytes)
    if algo.data_format == "prompt":  # online: step 0 began with the rollout (generation, scoring, reference,
        first, rollout = rows[0], ROLLOUT[device.type]  # values); it gets its own row, the updates another
        length = first.get("response_length") or rollout["new"]
        per_token = 2 * (2 * linear_params(algo.policy) + N - linear_params(algo.policy))  # policy, ref, critic
        result["rollout"] = dict(tokens=rollout["batch"] * length, step_s=first["data_s"], data_s=first["data_s"],
                                 pad=0.0, flops=rollout["batch"] * (rollout["prompt"] + length) * per_token)
        result["step_s"] = statistics.median(r["step_s"] - r["data_s"] for r in timed)
    return result


def optimizer_bytes(optimizer):
    """(bytes of the optimizer's state tensors, bytes of the gradients of its parameters) right after a step."""
    state = sum(t.numel() * t.element_size() for per_param in optimizer.state.values() for t in per_param.values()
                if torch.is_tensor(t))
    grads = sum(p.grad.numel() * p.grad.element_size() for g in optimizer.param_groups for p in g["params"]
                if p.grad is not None)
    return state, grads


def run_one(spec):
    """One config in this (fresh) process -> a result dict."""
    global clock
    clock = time.process_time if spec["clock"] == "cpu" and spec["device"] == "cpu" else time.perf_counter
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if spec["algo"] == "matmul":
        return dict(gflops=matmul_peak(device, getattr(torch, DTYPES[spec["dtype"]])))
    bf16 = spec["dtype"] == "bf16"
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model = build_model(spec["model"], device)
    load_peak_mb, loaded_mb = reset_peak(device)  # libraries + weights; the run's growth is measured above this
    with tempfile.TemporaryDirectory() as workdir:
        if spec["algo"] == "generate":
            result = bench_generate(spec, device, model, autocast)
        else:
            result = bench_algorithm(spec, device, model, autocast, workdir)
    run_peak_mb = peak_memory_mb(device)
    from nanoalign.lora import is_lora_param
    result.update(params=sum(p.numel() for n, p in model.named_parameters() if not is_lora_param(n)),  # the base's
                  peak_mb=max(load_peak_mb, run_peak_mb), run_mb=run_peak_mb - loaded_mb)
    return result


# ------------------------------------------------------------------------------------------ driver (parent)
def child(spec, timeout=3600):
    """Run one config in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-m", "nanoalign.bench", f"--child={json.dumps(spec)}"],
                         capture_output=True, text=True, timeout=timeout, env=env)
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def parse_args(argv):
    opts = dict(DEFAULTS)
    for arg in argv:
        key, has_value, value = arg.removeprefix("--").partition("=")
        if key not in opts and key != "child":
            raise SystemExit(f"unknown option --{key}; known: {', '.join('--' + k for k in DEFAULTS)}")
        opts[key] = value if has_value else True
    return opts


def available_algos(names):
    """(names to run, notes on the ones skipped)."""
    from nanoalign.algos import ALGORITHMS
    run, notes = [], []
    for name in names:
        if name == "generate" or name in ALGORITHMS:
            run.append(name)
        else:
            notes.append(f"{name}: not in the registry yet (nanoalign/algos/__init__.py), skipped")
    return run, notes


def relevant(algo, switch, first):
    """False for ablation values that change nothing for `algo` (they would only repeat a row): a ref_logps value
    other than the first one (`first`: the first value of each switch) for algorithms without that key (and
    generation), and a lora value other than the first one for generation (nothing trains)."""
    from nanoalign.algos import get_algorithm
    if algo == "generate":
        return switch["lora"] == first["lora"] and switch["ref_logps"] == first["ref_logps"]
    config = get_algorithm(algo).Config
    has_ref = config is not None and "ref_logps" in {f.name for f in dataclasses.fields(config)}
    return has_ref or switch["ref_logps"] == first["ref_logps"]


def ratio_lines(results):
    """One line per LoRA row: its peak memory, run memory and step time over those of the full fine-tuning row
    with the same device, model, dtype, algorithm and other switches."""
    same = lambda r: tuple(r[k] for k in ("device", "model", "dtype", "algo", *SWITCHES) if k != "lora")  # noqa: E731
    full = {same(r): r for r in results if str(r["lora"]) == "0" and "error" not in r}
    lines = []
    for r in results:
        f = full.get(same(r))
        if str(r["lora"]) == "0" or "error" in r or f is None:
            continue
        lines.append(f"ratio LoRA r={r['lora']} / full, {r['model']} {r['dtype']} {r['algo']} "
                     f"({f['variant']}): peak MB {r['peak_mb'] / f['peak_mb']:.2f} "
                     f"({r['peak_mb']:.0f} / {f['peak_mb']:.0f}), run MB {r['run_mb'] / f['run_mb']:.2f} "
                     f"({r['run_mb']:.0f} / {f['run_mb']:.0f}), step s {r['step_s'] / f['step_s']:.2f} "
                     f"({r['step_s']:.3f} / {f['step_s']:.3f}), trainable {r['trainable'] / f['trainable']:.4f}")
    return lines


def format_table(results):
    head = ["device", "model", "params", "dtype", "algo", "variant", "tokens/step", "step s", "(data s)",
            "tokens/s", "peak MB", "run MB", "trainable", "opt+grad MB", "MFU %", "pad %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['model']} | | {r['dtype']} | {r['algo']} | {r['variant']} | "
                         f"failed: {r['error'][:120]} |")
            continue
        mfu = 100 * r["flops"] / r["step_s"] / (r["peak_gflops"] * 1e9)
        trainable = f"{r['trainable'] / 1e6:.3g}M" if "trainable" in r else ""  # generate trains nothing
        state_mb = f"{(r['optimizer_state_bytes'] + r['grad_bytes']) / 2**20:.0f}" if "trainable" in r else ""
        lines.append(f"| {r['device']} | {r['model']} | {r['params'] / 1e6:.0f}M | {r['dtype']} | {r['algo']} | "
                     f"{r['variant']} | {r['tokens']:.0f} | {r['step_s']:.3f} | {r['data_s']:.3f} | "
                     f"{r['tokens'] / r['step_s']:.0f} | {r['peak_mb']:.0f} | {r['run_mb']:.0f} | "
                     f"{trainable} | {state_mb} | {mfu:.1f} | {100 * r.get('pad', 0):.0f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--peers" in argv:  # its own keys (nanoalign/bench_peers.py)
        from nanoalign.bench_peers import main as peers_main
        return peers_main([a for a in argv if a != "--peers"])
    opts = parse_args(argv)
    if "child" in opts:
        print(json.dumps(run_one(json.loads(opts["child"]))))
        return
    split = lambda key: [v for v in str(opts[key]).split(",") if v]  # noqa: E731
    devices = split("devices") or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    algos, notes = available_algos(split("algos"))
    switches = [dict(zip(SWITCHES, combo)) for combo in itertools.product(*(split(k) for k in SWITCHES))]
    results = []
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    for device, dtype in itertools.product(devices, split("dtypes")):
        common = dict(threads=opts["threads"], clock=opts["clock"], lora_targets=opts["lora_targets"])
        peak = child(dict(algo="matmul", device=device, dtype=dtype, **common))["gflops"]
        print(f"{device} {dtype}: matmul peak {peak:.0f} GFLOP/s", flush=True)
        for model, algo, switch in itertools.product(split("models"), algos, switches):
            if not relevant(algo, switch, switches[0]):
                continue
            big = model != "toy"
            spec = dict(device=device, dtype=dtype, model=model, algo=algo, **switch, **common,
                        warmup=int(opts["warmup"] or 1), steps=int(opts["steps"] or (2 if big else 5)))
            runs = [child(spec) for _ in range(int(opts["repeats"]))]
            ok = [r for r in runs if "error" not in r]
            result = min(ok, key=lambda r: abs(r["step_s"] - statistics.median(x["step_s"] for x in ok))) if ok else runs[0]
            variant = ",".join(f"{k}={v}" for k, v in switch.items() if str(v) != DEFAULTS[k]) or "default"
            rows = [{**spec, **result, "variant": variant, "peak_gflops": peak}]
            if "rollout" in result:  # an online algorithm: its rollout and its update steps on separate rows
                rows = [{**rows[0], **result["rollout"], "algo": f"{algo} rollout"}, {**rows[0], "algo": f"{algo} update"}]
            results += rows
            print("\n".join(format_table(rows).splitlines()[2:]), flush=True)
    print("\n" + format_table(results))
    for line in ratio_lines(results):
        print(line)
    for note in notes:
        print("note:", note)
    if opts["json"]:
        Path(opts["json"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
