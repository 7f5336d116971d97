"""nanoalign against its peers on the same weights, data, batch, sequence lengths and dtype:
DPO training steps vs TRL's DPOTrainer, and generate() vs transformers' generate() at PPO rollout shapes.

    python -m venv --system-site-packages /tmp/trlvenv           # reuses the installed torch
    /tmp/trlvenv/bin/pip install --no-deps trl accelerate datasets dill multiprocess xxhash pyarrow pandas psutil
    /tmp/trlvenv/bin/python bench/bench.py --peers --threads=1 --clock=cpu --repeats=3

trl / transformers / datasets are imported only here, inside the functions that use them: they are peers, not
dependencies. One random
GPT-2-shaped model (GPT2LMHeadModel, seed 0) and a byte-level tokenizer without merges (id = byte value, so both
libraries see identical token ids) are saved once as a Hugging Face directory; TRL loads it with from_pretrained,
nanoalign with nanoalign.hf.weights.load_hf_model (its hf:<dir> path). Every measurement runs in a fresh subprocess (peak
RSS / CUDA memory is its own); the libraries alternate within each repeat, and the table shows medians over repeats
and the median of the per-repeat ratios. Step time = time between the ends of consecutive optimizer steps (data
loading, forward, backward, clipping, AdamW), after one warmup step; reference log-probs are either precomputed
before training (nanoalign's default; TRL's precompute_ref_log_probs=True) or computed live by a second model
every step (TRL's default). The batch is one micro-batch (no accumulation), so both pad the same rows to the same
length. Keys: model (gpt2, gpt2m, toy), dtypes, repeats, steps, threads, clock, tasks (dpo, generate), json (path:
every run's numbers).

TRL's settings are its defaults except what makes the two runs the same job: per-device batch 4 pairs, no
accumulation, lr 1e-4, beta 0.1, sigmoid loss, max_grad_norm 1.0, dropout off, max_length None (nothing is cut),
bf16 = autocast with fp32 master weights (like ours), no logging/saving. Its defaults then give it fused AdamW
(transformers' "adamw_torch_fused" for torch >= 2.8) and its own chunked LM head (trl add_fused_lm_head: no
(B, T, V) logits; on a CPU it scores every position, on CUDA/Triton only the completion ones). transformers'
generate: do_sample, top_k=0 (its default 50 switched off, as ours samples the full distribution), temperature 1,
KV cache, exactly `new` tokens (min_new_tokens, no EOS), autocast around the call for bf16 as for ours.
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import (DTYPES, MODELS, ROLLOUT, SWITCHES, Memory, autocast_for, make_clock, sync, time_algorithm,
                    write_data)
from nanoalign.hf.tokenizer import bytes_to_unicode
from nanoalign.hf.weights import load_hf_model
from nanoalign.trainer import set_kernels

DPO_SHAPE = dict(prompt=(16, 48), completion=(16, 64), batch=4, micro=4)  # pairs per step: one micro-batch
DEFAULTS = dict(model="gpt2", dtypes="fp32,bf16", repeats="3", steps="3", threads="", clock="wall",
                tasks="dpo,generate", json="")


# ------------------------------------------------------------------------------------------ shared files
def prepare(workdir, model_name):
    """The HF model directory (random GPT-2 weights + byte tokenizer) and the preference JSONL, written once."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    shape = MODELS[model_name][0]
    if shape["arch"] != "gpt2":
        raise SystemExit(f"--model={model_name}: the peer comparison builds GPT2LMHeadModel, give a GPT-2 shape")
    config = GPT2Config(vocab_size=shape["vocab_size"], n_positions=shape["block_size"], n_embd=shape["n_embd"],
                        n_layer=shape["n_layer"], n_head=shape["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    torch.manual_seed(0)
    model_dir = Path(workdir) / "model"
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    vocab = {c: b for b, c in bytes_to_unicode().items()}  # byte b <-> id b, no merges
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    if (hf_tok.eos_token_id, hf_tok.pad_token_id) != (256, 257):
        raise RuntimeError(f"byte tokenizer: eos {hf_tok.eos_token_id}, pad {hf_tok.pad_token_id}, not 256 and 257")
    hf_tok.save_pretrained(model_dir)
    write_data(Path(workdir) / "prefs.jsonl", "preference", DPO_SHAPE, n_rows=DPO_SHAPE["batch"])
    return model_dir


# ------------------------------------------------------------------------------------------ one measurement
def trl_dpo(spec, model_dir, data, device, clock, memory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    ends = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            ends.append(clock())

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir) if spec["ref"] == "live" else None
    memory.loaded()
    rows = [json.loads(line) for line in open(data)]
    args = DPOConfig(output_dir=str(Path(data).parent / "trl_out"), per_device_train_batch_size=DPO_SHAPE["micro"],
                     gradient_accumulation_steps=1, max_steps=1 + spec["steps"], learning_rate=1e-4,
                     bf16=spec["dtype"] == "bf16", use_cpu=device.type == "cpu", report_to=[], save_strategy="no",
                     logging_steps=10_000, dataloader_num_workers=0, max_length=None, beta=0.1, seed=0,
                     precompute_ref_log_probs=spec["ref"] == "precompute", disable_dropout=True, max_grad_norm=1.0)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    trainer.add_callback(StepClock())
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


def nanoalign_dpo(spec, model_dir, data, device, clock, memory):
    model, _ = load_hf_model(model_dir, device)
    set_kernels(DTYPES[spec["dtype"]], device, model.cfg)  # as the trainer decides
    memory.loaded()
    run = {**SWITCHES, "algo": "dpo", "dtype": spec["dtype"], "ref_logps": spec["ref"], "warmup": 1,
           "steps": spec["steps"]}
    with tempfile.TemporaryDirectory() as workdir:
        result = time_algorithm(run, device, model, autocast_for(spec["dtype"], device), workdir, DPO_SHAPE, data,
                                clock)
    return result["step_times"]


def generate_times(spec, model_dir, device, clock, memory):
    """Seconds per generate() call of a batch of rollout prompts, sampling at temperature 1 to the full length."""
    shape = ROLLOUT[device.type]
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (shape["batch"], shape["prompt"]), generator=g)
    if spec["lib"] == "transformers":
        from transformers import GPT2LMHeadModel
        model = GPT2LMHeadModel.from_pretrained(model_dir).to(device).eval()
        kwargs = dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=shape["new"],
                      min_new_tokens=shape["new"], eos_token_id=None, pad_token_id=257, use_cache=True)
        call = lambda: model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts).to(device), **kwargs)  # noqa: E731
    else:
        model = load_hf_model(model_dir, device)[0].eval()
        set_kernels(DTYPES[spec["dtype"]], device, model.cfg)  # as the trainer decides
        call = lambda: model.generate(prompts.tolist(), shape["new"], temperature=1.0, eos_id=None)  # noqa: E731
    memory.loaded()
    times = []
    for _ in range(1 + spec["steps"]):
        torch.manual_seed(len(times))
        sync(device)
        t0 = clock()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["dtype"] == "bf16"):
            out = call()
        sync(device)
        times.append(clock() - t0)
    n_new = (out.tokens.shape[1] if hasattr(out, "tokens") else out.shape[1] - shape["prompt"])
    if n_new != shape["new"]:
        raise RuntimeError(f"{spec['lib']} generated {n_new} tokens, not {shape['new']}: the runs are not comparable")
    return times[1:]


def run_one(spec):
    if spec["threads"]:
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clock = make_clock(spec["clock"], device)
    memory = Memory(device)
    if spec["task"] == "generate":
        times = generate_times(spec, spec["model_dir"], device, clock, memory)
    elif spec["lib"] == "trl":
        times = trl_dpo(spec, spec["model_dir"], spec["data"], device, clock, memory)
    else:
        times = nanoalign_dpo(spec, spec["model_dir"], spec["data"], device, clock, memory)
    return dict(step_s=statistics.median(times), times=times, peak_mb=memory.peak_mb(),
                growth_mb=memory.peak_mb() - memory.loaded_mb, process_peak_mb=max(memory.load_peak_mb, memory.peak_mb()))


# ------------------------------------------------------------------------------------------ driver
def child(spec):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]),
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, __file__, f"--child={json.dumps(spec)}"],
                         capture_output=True, text=True, env=env, timeout=3600)
    if run.returncode != 0:
        raise RuntimeError(f"{spec['lib']} {spec['task']} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None):
    opts = dict(DEFAULTS)
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in opts and key != "child":
            raise SystemExit(f"unknown option --{key}; known: {', '.join('--' + k for k in DEFAULTS)}")
        opts[key] = value
    if "child" in opts:
        print(json.dumps(run_one(json.loads(opts["child"]))))
        return
    import transformers
    split = lambda key: [v for v in opts[key].split(",") if v]  # noqa: E731
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if "dpo" in split("tasks"):  # trl only for the DPO comparison: generate's needs transformers alone
        import trl
        versions += f", trl {trl.__version__}"
    print(f"{versions}, {os.cpu_count()} CPU cores, threads={opts['threads'] or 'default'}, clock={opts['clock']}",
          flush=True)
    cases = []  # (task, variant, [libraries in the order they alternate])
    if "dpo" in split("tasks"):
        cases += [("dpo", "precompute", ["nanoalign", "trl"]), ("dpo", "live", ["nanoalign", "trl"])]
    if "generate" in split("tasks"):
        cases += [("generate", "", ["nanoalign", "transformers"])]
    with tempfile.TemporaryDirectory() as workdir:
        model_dir = prepare(workdir, opts["model"])
        results = {}
        for repeat in range(int(opts["repeats"])):
            for (task, ref, libs), dtype in ((c, d) for c in cases for d in split("dtypes")):
                for lib in libs if repeat % 2 == 0 else libs[::-1]:  # alternate who goes first
                    spec = dict(task=task, ref=ref, lib=lib, dtype=dtype, steps=int(opts["steps"]),
                                threads=opts["threads"], clock=opts["clock"], model_dir=str(model_dir),
                                data=str(Path(workdir) / "prefs.jsonl"))
                    r = child(spec)
                    results.setdefault((task, ref, dtype, lib), []).append(r)
                    print(f"repeat {repeat}: {task} {ref} {dtype} {lib}: {r['step_s']:.3f} s, "
                          f"peak {r['peak_mb']:.0f} MB", flush=True)
    print(format_table(results, cases, split("dtypes"), opts))
    if opts["json"]:
        Path(opts["json"]).write_text(json.dumps([dict(zip(("task", "ref", "dtype", "lib"), key), runs=runs)
                                                  for key, runs in results.items()], indent=1))


def format_table(results, cases, dtypes, opts):
    shape = ROLLOUT["cuda" if torch.cuda.is_available() else "cpu"]
    lines = [f"model {opts['model']}; DPO: {DPO_SHAPE['batch']} pairs per step, prompt {DPO_SHAPE['prompt']} and "
             f"answers {DPO_SHAPE['completion']} tokens; generate: batch {shape['batch']}, prompt {shape['prompt']}, "
             f"{shape['new']} new tokens, sampling", "",
             "| task | dtype | nanoalign s | peer s | speed-up (median of ratios) | nanoalign peak MB | peer peak MB | "
             "nanoalign growth MB | peer growth MB |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, ref, libs), dtype in ((c, d) for c in cases for d in dtypes):
        ours, peer = results[(task, ref, dtype, libs[0])], results[(task, ref, dtype, libs[1])]
        med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
        ratio = statistics.median(p["step_s"] / o["step_s"] for o, p in zip(ours, peer))
        name = f"{task} (ref {ref})" if ref else task
        lines.append(f"| {name} vs {libs[1]} | {dtype} | {med(ours, 'step_s'):.3f} | {med(peer, 'step_s'):.3f} | "
                     f"{ratio:.2f}x | {med(ours, 'peak_mb'):.0f} ({med(ours, 'process_peak_mb'):.0f}) | "
                     f"{med(peer, 'peak_mb'):.0f} ({med(peer, 'process_peak_mb'):.0f}) | {med(ours, 'growth_mb'):.0f} | "
                     f"{med(peer, 'growth_mb'):.0f} |")
    lines.append("\ns: median seconds per optimizer step (DPO) or per generate() call. peak MB: resident set (CPU) or "
                 "max allocated (CUDA) from the end of weight loading to the end of the run; in brackets the whole "
                 "process's peak, loading included. growth MB: the run's peak above the memory held once the weights were loaded "
                 "(libraries and weights excluded: activations, gradients, optimizer state, caches, tokenized data).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
