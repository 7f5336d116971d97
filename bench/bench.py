"""Speed and memory of every algorithm's training step: tokens/s, seconds per step, peak memory and model-FLOPs
utilisation, for each device x model x dtype x algorithm x ablation switch.

Each config runs in a fresh subprocess (so the peak memory is its own) on random weights and synthetic data: a few
optimizer steps of the registered algorithm, each trainer.train_step exactly as a training run takes it, after the
algorithm is configured as train.py configures it. MFU is against a matmul measured on the same device and dtype.

    python bench/bench.py                                      # everything (minutes per large model on a CPU)
    python bench/bench.py --algos=dpo,sft --models=toy,gpt2 --dtypes=bf16
    python bench/bench.py --algos=dpo --models=gpt2 --logps=fused,plain --bucket=1,0          # the ablations
    python bench/bench.py --algos=dpo,rm --models=gpt2 --lora=0,16 --ref_logps=precompute,live
    python bench/bench.py --algos=sft,dpo --models=gpt2 --ckpt=0,1                         # activation checkpointing
    python bench/bench.py --peers                              # against TRL and transformers (bench/peers.py)
    python bench/bench.py --gpu-check                          # one CUDA run: bf16 DPO/PPO/generate, compile 0/1,
                                                               # then DPO and generate against TRL / transformers

Comma-list keys: algos (sft, rm, dpo, kto, orpo, ppo, generate, any registry name), models (common.MODELS), dtypes
(fp32, bf16), devices (cpu, cuda), and the switches logps (fused, plain: the fused_logps key), bucket (1, 0:
bucket_by_length), ref_logps (precompute, live), compile (0, 1), lora (0 = full fine-tuning, r = rank r, alpha 2r),
ckpt (0, 1: activation_checkpointing), decode (auto: as the trainer decides; packed, plain: generate()'s linear layers
on prepacked weights or not, model.set_packed_decode).
Scalars: steps, warmup, repeats (the median run is shown), threads, clock (wall, or cpu: the process's CPU seconds,
steadier on a shared machine), lora_targets, json (a path for every row).
"peak MB" is the whole process (CUDA max allocated, or peak RSS); "run MB" is the peak above the memory held once
the weights were built: data, a reference, optimizer state, gradients, activations. FLOPs follow nanoGPT / PaLM:
6 N + 12 L d T per trained token (N = linear-layer weights; a frozen one, as LoRA's base, counts 4), 2 N + 4 L d T
per token forwarded without gradient or generated. Online algorithms get a rollout row and an update row.
"""
import dataclasses
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import common
import peers
from common import DTYPES, MODELS, ROLLOUT, SWITCHES, Memory, sync
from nanoalign.algos import ALGORITHMS, get_algorithm
from nanoalign.lora import is_lora_param
from nanoalign.model import set_packed_decode
from nanoalign.trainer import set_kernels

DEFAULTS = dict(algos="sft,rm,dpo,kto,orpo,ppo,generate", models="toy,gpt2,llama", dtypes="fp32,bf16", devices="",
                **SWITCHES, steps="", warmup="", repeats="1", json="", threads="", clock="wall", lora_targets="")
GPU_CHECK = dict(algos="dpo,ppo,generate", models="gpt2,llama", dtypes="bf16", devices="cuda", compile="0,1",
                 steps="2", warmup="1")  # --gpu-check: these unless given on the command line
BF16_PEAK_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "L4": 121,
                    "A10G": 70, "RTX 4090": 165, "RTX 3090": 71}  # dense bf16 tensor-core peaks, from datasheets


# ------------------------------------------------------------------------------------------ one config (child)
def matmul_peak(device, dtype, clock, n=None, repeats=10, budget_s=5.0):
    """Best GFLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype`: the MFU denominator. n is halved (down to 256)
    until `repeats` matmuls fit in about `budget_s` at the rate a 256^3 warm-up ran: on a CPU without native bf16,
    PyTorch emulates bf16 matmuls ~70x slower than fp32, and ten at 2048^3 took minutes."""
    def seconds(a, b):
        sync(device)
        t0 = clock()
        a @ b
        sync(device)
        return max(clock() - t0, 1e-6)

    small = torch.randn(256, 256, device=device).to(dtype)
    seconds(small, small)  # the first call picks the kernel
    rate = 2 * 256 ** 3 / seconds(small, small)  # FLOP/s
    n = n or (8192 if device.type == "cuda" else 2048)
    while n > 256 and repeats * 2 * n ** 3 / rate > budget_s:
        n //= 2
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    seconds(a, b)
    return 2 * n ** 3 / min(seconds(a, b) for _ in range(repeats)) / 1e9


def time_generate(spec, device, model, autocast, clock):
    """The PPO rollout's core: generate() with sampling on a batch of equal-length prompts, timed per call."""
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
    N, T = common.linear_params(model), shape["prompt"] + shape["new"]
    flops = (shape["batch"] * shape["prompt"] + new_tokens) * (2 * N + common.attention_flops_per_token(model, T / 2))
    return dict(tokens=new_tokens, step_s=statistics.median(times), data_s=0.0, flops=flops,
                shape=f"B={shape['batch']} P={shape['prompt']} new={shape['new']}")


def run_one(spec):
    """One config in this (fresh) process -> a result dict."""
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    clock = common.make_clock(spec["clock"], device)
    if spec["algo"] == "matmul":
        return dict(gflops=matmul_peak(device, getattr(torch, DTYPES[spec["dtype"]]), clock))
    autocast = common.autocast_for(spec["dtype"], device)
    model = common.build_model(spec["model"], device)
    set_kernels(DTYPES[spec["dtype"]], device, model.cfg)  # as the trainer decides
    if spec.get("decode", "auto") != "auto":  # the ablation: generate()'s linears packed or plain, not measured
        set_packed_decode(spec["decode"] == "packed")
    memory = Memory(device)
    memory.loaded()  # libraries + weights; the run's growth is measured above this
    if spec["algo"] == "generate":
        result = time_generate(spec, device, model, autocast, clock)
    else:
        workload = MODELS[spec["model"]][1 if device.type == "cpu" else 2]
        with tempfile.TemporaryDirectory() as workdir:
            result = common.time_algorithm(spec, device, model, autocast, workdir, workload, clock=clock)
    run_peak_mb = memory.peak_mb()
    result.update(params=sum(p.numel() for n, p in model.named_parameters() if not is_lora_param(n)),  # the base's
                  peak_mb=max(memory.load_peak_mb, run_peak_mb), run_mb=run_peak_mb - memory.loaded_mb)
    return result


# ------------------------------------------------------------------------------------------ driver (parent)
def child(spec, timeout=3600):
    """Run one config in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, __file__, f"--child={json.dumps(spec)}"], capture_output=True, text=True,
                         timeout=timeout, env=env)
    if run.returncode != 0:
        lines = [line for line in run.stderr.strip().splitlines() if line.strip()]
        return {"error": lines[-1] if lines else f"exit code {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def parse_args(argv):
    opts, given = dict(DEFAULTS), {}
    for arg in argv:
        key, has_value, value = arg.removeprefix("--").partition("=")
        if key not in opts and key not in ("child", "gpu-check"):
            raise SystemExit(f"unknown option --{key}; known: {', '.join('--' + k for k in DEFAULTS)}, --gpu-check, "
                             "--peers")
        given[key] = value if has_value else True
    if "gpu-check" in given:
        opts.update(GPU_CHECK)
    return {**opts, **given}


def available_algos(names):
    """(names to run, notes on the ones skipped)."""
    run, notes = [], []
    for name in names:
        if name == "generate" or name in ALGORITHMS:
            run.append(name)
        else:
            notes.append(f"{name}: not in the registry yet (nanoalign/algos/__init__.py), skipped")
    return run, notes


def relevant(algo, switch, first):
    """False for switch values that would only repeat a row (`first`: the first value of each switch): a ref_logps
    other than the first for algorithms without that key, any switch but the first values for generation (it
    trains nothing, computes no log-probs, and is not compiled), except decode."""
    if algo == "generate":  # only the decode kernel changes it
        return all(v == first[k] for k, v in switch.items() if k != "decode")
    config = get_algorithm(algo).Config
    has_ref = config is not None and "ref_logps" in {f.name for f in dataclasses.fields(config)}
    return has_ref or switch["ref_logps"] == first["ref_logps"]


def datasheet_gflops(device_name):
    """The dense bf16 peak of a GPU in BF16_PEAK_TFLOPS, in GFLOP/s (None for one not listed)."""
    for gpu, tflops in sorted(BF16_PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):  # "L40S" before "L4"
        if gpu in device_name:
            return tflops * 1e3
    return None


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


def speedup_lines(results):
    """One line per bf16 row: its step time against the fp32 row of the same device, model, algorithm and switches
    (the fp32 -> bf16 speed-up; each row's MFU is already against its own dtype's measured matmul peak)."""
    same = lambda r: tuple(r[k] for k in ("device", "model", "algo", *SWITCHES))  # noqa: E731
    fp32 = {same(r): r for r in results if r["dtype"] == "fp32" and "error" not in r}
    lines = []
    for r in results:
        f = fp32.get(same(r))
        if r["dtype"] != "bf16" or "error" in r or f is None:
            continue
        lines.append(f"speed-up fp32 -> bf16, {r['device']} {r['model']} {r['algo']} ({r['variant']}): "
                     f"{f['step_s'] / r['step_s']:.2f}x ({f['step_s']:.3f} s / {r['step_s']:.3f} s)")
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
    if "--peers" in argv:  # its own keys (bench/peers.py)
        return peers.main([a for a in argv if a != "--peers"])
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
        common_keys = dict(threads=opts["threads"], clock=opts["clock"], lora_targets=opts["lora_targets"])
        measured = child(dict(algo="matmul", device=device, dtype=dtype, **common_keys))["gflops"]
        peak = measured  # --gpu-check: MFU against the datasheet's bf16 peak where the GPU is listed
        if "gpu-check" in opts and device == "cuda" and dtype == "bf16":
            peak = datasheet_gflops(torch.cuda.get_device_name()) or measured
        print(f"{device} {dtype}: matmul {measured:.0f} GFLOP/s, MFU against {peak:.0f}", flush=True)
        for model, algo, switch in itertools.product(split("models"), algos, switches):
            if not relevant(algo, switch, switches[0]):
                continue
            big = model != "toy"
            spec = dict(device=device, dtype=dtype, model=model, algo=algo, **switch, **common_keys,
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
    for line in ratio_lines(results) + speedup_lines(results):
        print(line)
    for note in notes:
        print("note:", note)
    if "gpu-check" in opts and "cuda" in devices:  # the same DPO step (and generate) under TRL / transformers
        if importlib.util.find_spec("trl") is None:
            print("note: trl is not installed here: `pip install trl` adds TRL's DPO step (bench/peers.py)")
        else:
            peers.main(["--tasks=dpo,generate", "--dtypes=bf16", "--repeats=1", "--steps=3"])
    if opts["json"]:
        Path(opts["json"]).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
