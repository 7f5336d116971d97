"""THE training loop, shared by every algorithm (SFT, reward model, DPO family, KTO, ORPO, PPO, RLOO, GRPO, ...).

An algorithm is a subclass of `Algorithm` in nanoalign/algos/<name>.py. It owns the module being optimised, a
generator of micro-batches (offline: drawn from a dataset; online: a rollout phase, then minibatch epochs) and a
loss on one micro-batch. The loop below does everything else, once: AdamW, warmup + cosine LR, gradient
accumulation from a total batch size, clipping, bf16 autocast, DDP under torchrun, eval, logging, atomic
checkpoints and exact resume.
"""
import contextlib
import datetime
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nanoalign.checkpoint import load_checkpoint, save_checkpoint
from nanoalign.config import ConfigError, config_to_dict
from nanoalign.data import collate, load_examples, micro_batches, to_device
from nanoalign.fsdp import full_state, full_tensor, is_sharded, load_optimizer_state, shard
from nanoalign.loading import apply_lora, build_policy, load_trainable_state, trainable_state
from nanoalign.model import set_activation_checkpointing, set_attention_fp32, set_packed_decode
from nanoalign.precision import bf16_is_faster, cast_frozen_linears_, fp32_attention_is_faster, packed_decode_is_faster
from nanoalign.report import Reporters, parse
from nanoalign.rundir import check_resumable, claim, trim_metrics


@dataclass
class Context:
    """What an algorithm needs to know about the run it is part of."""
    device: torch.device
    rank: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    autocast: object  # a zero-argument callable returning the autocast context manager
    inference_dtype: object = None  # what no-grad models are stored in: torch.bfloat16 in a bf16 run (precision.py)

    @property
    def master(self):
        return self.rank == 0


class Algorithm:
    """The plug-in protocol. Subclasses set `name`, `Config` (a dataclass of their own hyperparameters, merged
    into the one flat run config), `data_format` ("sft" | "text" | "preference" | "binary" | "prompt") and
    `key_metrics` (shown on the progress bar), and implement `loss`. Offline algorithms load their tokenised
    dataset into `self.examples` and inherit `batches` and `collate`; online ones override `batches`."""
    name = ""
    Config = None
    data_format = "sft"
    key_metrics = ()
    checkpoint_kind = "policy"
    steps_per_rollout = 1  # optimizer steps that share one rollout (online algorithms); checkpoints fall between
    starts_from = "sft"  # the pipeline stage a preference algorithm starts from: "sft", or "base" (ORPO: no SFT stage)

    @classmethod
    def format_prompt(cls, cfg, prompt):
        """The text a trained policy is sampled from for `prompt` (CoH appends its feedback phrase)."""
        return prompt

    def __init__(self, cfg, policy, tokenizer, ctx):
        self.cfg, self.policy, self.tokenizer, self.ctx = cfg, policy, tokenizer, ctx
        self.module = policy  # what the optimiser updates and the checkpoint stores
        self.eval_examples = []  # evaluate() averages the loss over these (the default below)

    @property
    def max_len(self):
        """The longest sequence a row may have: cfg.max_len, cut to what the model's positions hold."""
        return min(self.cfg.max_len, self.policy.cfg.block_size)

    def log(self, *args):
        """print on rank 0 only."""
        if self.ctx.master:
            print(*args)

    def load_data(self, fmt):
        """(training examples, eval examples) of cfg.data and cfg.eval_data ([] without), read by load_file."""
        cfg = self.cfg
        return self.load_file(cfg.data, fmt), (self.load_file(cfg.eval_data, fmt) if cfg.eval_data else [])

    def load_file(self, path, fmt):
        """Tokenised examples of one JSONL file in `fmt`, sequences fitted to max_len (data.load_examples)."""
        return load_examples(path, fmt, self.tokenizer, self.max_len, log=self.log)

    def collate(self, examples):
        """Pad a list of tokenised examples into one batch of tensors (data.collate; override to add fields)."""
        return collate(examples, self.tokenizer.pad_id)

    def batches(self, start_step):
        """Yield this rank's micro-batches (dicts of tensors), forever; skip the first `start_step` optimizer steps.
        Default: length-bucketed, reshuffled passes over `self.examples` (data.micro_batches)."""
        c = self.ctx
        return micro_batches(self.examples, c.micro_batch_size, c.grad_accum, c.rank, c.world_size, self.cfg.seed,
                             start_step, self.collate, bucket=self.cfg.bucket_by_length)

    def loss(self, model, batch):
        """(scalar loss, metrics dict) for one micro-batch. `model` is self.module wrapped by DDP / torch.compile."""
        raise NotImplementedError

    def policy_answers_in_fp32(self):
        """True when the policy itself runs outside the run's autocast (self_reward's fp32 self-judge); a bf16 LoRA run
        then keeps its frozen base in fp32 instead of storing it in bf16 (precision.cast_frozen_linears_)."""
        return False

    def has_signal(self, batch):
        """False when `batch` cannot move the weights (every row weighted 0: an online judge kept no pair). The
        trainer skips the optimizer step when no micro-batch on any rank has signal: AdamW's momentum would
        otherwise keep moving the weights on a zero gradient."""
        return True

    def evaluate(self, model):
        """eval/<metric>: the loss and metrics of `loss` averaged over the first cfg.eval_batches micro-batches of
        self.eval_examples (called in eval mode under no_grad); {} without eval data."""
        sums, n, size = {}, 0, self.ctx.micro_batch_size
        for i in range(0, min(len(self.eval_examples), size * self.cfg.eval_batches), size):
            loss, metrics = self.loss(model, to_device(self.collate(self.eval_examples[i:i + size]), self.ctx.device))
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {f"eval/{k}": v / n for k, v in sums.items()}

    def state_dict(self):
        """The algorithm's own state beyond the module's weights (e.g. PPO's adaptive KL coefficient), saved as
        entries of the checkpoint; `load_state_dict` gets the whole checkpoint back on resume."""
        return {}

    def load_state_dict(self, ckpt):
        """Restore what state_dict saved (called on resume, after the weights are loaded)."""

    def finish(self, model):
        """Called once on every rank after the last step, before the final checkpoint."""


def resolve_device(device):
    """"auto" -> "cuda" when a GPU is there, else "cpu"; any other name as it is."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def setup_distributed(cfg):
    """DDP is on when torchrun set RANK; gloo on CPU, nccl on CUDA. Safe to call more than once."""
    name = resolve_device(cfg.device)
    if "RANK" not in os.environ:
        return 0, 1, torch.device(name)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if name.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.ddp_timeout_s))  # a stalled rank stops all
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def cpu_has_bf16():
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype, device, model_cfg, world_size=1):
    """The run's dtype from its `dtype` key. "auto" is bf16 on CUDA GPUs that support it, and on CPUs with native bf16
    (avx512_bf16 / AMX) only where a matmul of the model's MLP shape is measured faster in bf16
    (precision.bf16_is_faster); rank 0's measurement decides for every rank. An explicit "bfloat16" on a CPU without
    native bf16 is kept, with a warning: there PyTorch emulates bf16 matmuls (docs/performance.md measured one ~70x
    slower than fp32 on an AVX2-only CPU)."""
    rank0 = world_size == 1 or dist.get_rank() == 0
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16() and rank0:
        print("warning: dtype=bfloat16 on a CPU without native bf16 (no avx512_bf16 / amx_bf16 in /proc/cpuinfo): "
              "its bf16 matmuls are emulated, many times slower than float32; dtype=auto picks float32 here")
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    faster = device.type == "cpu" and cpu_has_bf16() and bf16_is_faster(model_cfg.n_embd, model_cfg.mlp_hidden)
    return "bfloat16" if rank0_decides(faster, world_size) else "float32"


def rank0_decides(flag, world_size):
    """Rank 0's `flag` on every rank: a choice measured on each rank's machine would differ between ranks."""
    if world_size == 1:
        return flag
    decision = torch.tensor([float(flag)])
    dist.broadcast(decision, 0)
    return bool(decision.item())


def set_kernels(dtype, device, model_cfg, world_size=1):
    """The process-wide kernel choices of a run, for every model in it (policy, reference, scorers alike), each
    measured on this machine at the model's shapes, rank 0 deciding for all ranks: on a CPU, attention in fp32 inside
    a bf16 autocast (model.set_attention_fp32, where precision.fp32_attention_is_faster) and, in an fp32 run,
    generate()'s linear layers on prepacked weights (model.set_packed_decode, where precision.packed_decode_is_faster).
    Returns the two choices."""
    cpu = device.type == "cpu"
    attention_fp32 = rank0_decides(cpu and dtype == "bfloat16" and
                                   fp32_attention_is_faster(model_cfg.n_head, model_cfg.head_dim), world_size)
    packed_decode = rank0_decides(cpu and dtype == "float32" and
                                  packed_decode_is_faster(model_cfg.n_embd, model_cfg.mlp_hidden), world_size)
    set_attention_fp32(attention_fp32)
    set_packed_decode(packed_decode)
    return attention_fp32, packed_decode


def make_optimizer(module, cfg, device):
    """AdamW; weight decay only on matrices of linear layers (not norms, biases or embeddings). The fused kernel on
    CUDA and CPU (one pass over each tensor instead of ~10 elementwise ops; on a CPU it cut a GPT-2-124M step's
    optimizer time from 0.92 s to 0.17 s; tests/test_speed_equivalence.py checks it against the for-loop AdamW)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=device.type in ("cuda", "cpu"))


def lr_at(step, cfg):
    """Linear warmup for warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class StopSignal:
    """SIGTERM and SIGINT (Ctrl-C, a scheduler's preemption) set a flag instead of killing the run mid-step; the loop
    asks `requested` after each step (all ranks agree through one all_reduce) and saves before it exits. A second
    signal of the same kind acts as usual. A context manager: the previous handlers come back on exit."""

    def __enter__(self):
        self.name, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, self.previous[signum])  # the next one stops at once

    def requested(self, world_size, device):
        flag = torch.tensor(float(self.name is not None), device=device)
        if world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            self.name = self.name or ("a signal on another rank" if flag.item() else None)
        return bool(flag.item())

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def agree(claim_out_dir, rank, world_size):
    """Run claim_out_dir on rank 0 and make every rank raise its error, if any (else all would wait at the first
    collective for a rank that is gone). Returns rank 0's lock file, None elsewhere."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = claim_out_dir()
        except ConfigError as err:
            error = str(err)
    if world_size > 1:
        message = [error]
        dist.broadcast_object_list(message, src=0)
        error = message[0]
    if error:
        raise ConfigError(error)
    return lock


def summary(record, prefix, keys=None):
    """"loss 0.52, rewards/margins 1.3" of the keys (default: all starting with prefix) of a metrics row."""
    keys = keys or [k for k in record if k.startswith(prefix)]
    return ", ".join(f"{k} {record[k]:.4g}" for k in keys if k in record)


def split_batch(batch_size, micro_batch_size, world_size):
    """(micro batch, accumulation steps) for a global batch over world_size ranks, as nanoGPT derives them: each rank
    takes batch_size / world_size examples per step in micro-batches of the largest size <= micro_batch_size that
    divides them, so the same command runs on 1 or 8 ranks with the same global batch."""
    if batch_size < 1 or micro_batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} and micro_batch_size={micro_batch_size} must be >= 1")
    if batch_size % world_size:
        raise ConfigError(f"batch_size={batch_size} does not split evenly over {world_size} ranks: use a multiple "
                          f"of {world_size}")
    per_rank = batch_size // world_size
    micro = max(d for d in range(1, min(micro_batch_size, per_rank) + 1) if per_rank % d == 0)
    return micro, per_rank // micro


def reduce_metrics(sums, count, world_size, device):
    """Average the accumulated metrics over micro-steps and ranks (every rank calls this at the same step)."""
    keys = sorted(sums)
    values = torch.tensor([float(sums[k]) / count for k in keys], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return dict(zip(keys, values.tolist()))


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def add_metrics(sums, metrics):
    """sums[k] += v for every metric of one micro-batch (tensors detached, kept on their device)."""
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v)


def train_step(model, module, algo, optimizer, batches, grad_clip, on_micro_batch=None):
    """One optimizer step as every run takes it: ctx.grad_accum micro-batches (forward under the run's autocast,
    backward of loss / grad_accum; under DDP the gradients are all-reduced on the last one only), the global gradient
    norm (clipped to grad_clip when > 0), then AdamW -- unless the loss or the norm is non-finite on any rank: then the
    gradients are dropped and the weights stay as they were, on every rank alike.
    Mixed precision: the micro-batches are fetched first (an online algorithm's rollout, with its no-grad forwards,
    happens there), then ONE autocast region spans every forward of the step, so autocast casts each fp32 weight to
    bf16 once per optimizer step and reuses the cast for every micro-batch (its cache lives until the outermost
    region exits); each backward runs in a nested region with autocast off, as PyTorch recommends, which keeps that
    cache (a no-grad forward inside the region caches nothing that would cut a gradient off).
    tests/test_mixed_precision.py checks the gradients against one region per micro-batch for every algorithm.
    A step whose micro-batches have no signal on any rank (Algorithm.has_signal) is computed for its metrics but
    not taken. Returns (metric sums over the micro-batches, {"data": s, "update": s}, outcome): outcome is "stepped",
    "nonfinite" or "no_signal". `on_micro_batch(batch, metrics)` is called after each backward (the benchmark counts
    tokens there)."""
    ctx, sums = algo.ctx, {}
    t0 = time.perf_counter()
    step_batches = [to_device(next(batches), ctx.device) for _ in range(ctx.grad_accum)]  # online: rollouts here
    t1 = time.perf_counter()
    times = {"data": t1 - t0, "update": 0.0}
    with ctx.autocast():
        for micro, batch in enumerate(step_batches):
            if ctx.world_size > 1:  # all-reduce gradients only on the last micro-step (set before its forward)
                if is_sharded(module):
                    module.set_requires_gradient_sync(micro == ctx.grad_accum - 1)  # FSDP: reduce-scatter then
                else:
                    model.require_backward_grad_sync = micro == ctx.grad_accum - 1
            loss, metrics = algo.loss(model, batch)
            with torch.autocast(ctx.device.type, enabled=False):
                (loss / ctx.grad_accum).backward()
            add_metrics(sums, {"loss": loss, **metrics})
            if on_micro_batch is not None:
                on_micro_batch(batch, metrics)
    times["update"] += time.perf_counter() - t1
    t2 = time.perf_counter()
    trainable = [p for p in module.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(trainable, grad_clip if grad_clip > 0 else float("inf"))  # inf: no clip
    norm = full_tensor(norm)  # FSDP: the norm over every rank's shards
    bad = (~torch.isfinite(sums["loss"]) | ~torch.isfinite(norm)).float()
    signal = torch.tensor([float(any(algo.has_signal(batch) for batch in step_batches))], device=bad.device)
    if ctx.world_size > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips, or none does
        dist.all_reduce(signal, op=dist.ReduceOp.MAX)  # one rank with a kept row is enough to step
    outcome = "nonfinite" if bool(bad) else "stepped" if bool(signal) else "no_signal"
    if outcome == "stepped":
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = ctx.grad_accum * float(norm)  # averaged per micro-step when logged
    times["update"] += time.perf_counter() - t2
    return sums, times, outcome


def train(cfg, algorithm_cls, stop_after=None):
    """Run `algorithm_cls` with config `cfg` to cfg.max_steps; returns the out dir (ckpt.pt, metrics.jsonl).
    `stop_after` ends the run early as if it had been interrupted there (the resume test uses it). The out dir is
    claimed first (rundir.claim: refused if it holds another run, locked for this run's life)."""
    rank, world_size, device = setup_distributed(cfg)
    out_dir = Path(cfg.out_dir)
    parse(cfg.report_to)  # a typo fails before anything is written
    lock = agree(lambda: claim(out_dir, cfg.resume, cfg.overwrite), rank, world_size)  # before anything is written
    try:
        with StopSignal() as stop:
            return run(cfg, algorithm_cls, stop_after, rank, world_size, device, out_dir, stop)
    finally:
        if lock is not None:
            lock.close()  # releases the flock


def finish_lora(algo, cfg):
    """LoRA's side of a run once the algorithm is built (a no-op without lora_rank): adapters on any other LM it
    made (a critic, a reward trunk); then, in a bf16 run, the frozen base stored in bf16 once instead of cast by
    autocast every step (precision.cast_frozen_linears_; same numbers). Not under FSDP, whose policy casts when it
    gathers, nor when the policy answers outside autocast (policy_answers_in_fp32)."""
    apply_lora(algo.module, cfg)
    if cfg.lora_rank and algo.ctx.inference_dtype is not None and not cfg.fsdp and not algo.policy_answers_in_fp32():
        cast_frozen_linears_(algo.module, algo.ctx.inference_dtype)


def run(cfg, algorithm_cls, stop_after, rank, world_size, device, out_dir, stop):
    """The loop itself, on a claimed out dir (see train)."""
    micro_batch_size, grad_accum = split_batch(cfg.batch_size, cfg.micro_batch_size, world_size)
    if micro_batch_size != cfg.micro_batch_size and rank == 0:
        print(f"micro_batch_size {cfg.micro_batch_size} -> {micro_batch_size}: batch_size {cfg.batch_size} over "
              f"{world_size} rank(s) is {cfg.batch_size // world_size} examples per rank per step")
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    policy, tokenizer = build_policy(cfg, device)  # with LoRA adapters already, so pi_ref = adapters off
    dtype = resolve_dtype(cfg.dtype, device, policy.cfg, world_size)
    attention_fp32, packed_decode = set_kernels(dtype, device, policy.cfg, world_size)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext
    ctx = Context(device, rank, world_size, micro_batch_size, grad_accum, autocast,
                  torch.bfloat16 if dtype == "bfloat16" else None)
    algo = algorithm_cls(cfg, policy, tokenizer, ctx)
    finish_lora(algo, cfg)
    module = set_activation_checkpointing(algo.module.to(device), cfg.activation_checkpointing)
    if cfg.fsdp and world_size == 1 and not dist.is_initialized():
        raise ConfigError("fsdp=true shards over the ranks of torchrun: run `torchrun --nproc_per_node=N train.py ...`")

    start_step, ckpt = 0, None
    resume_from = out_dir / "ckpt.pt"
    if cfg.resume:
        ckpt = load_checkpoint(resume_from, device)
        check_resumable(ckpt, algo.name, asdict(algo.policy.cfg), tokenizer.spec)
        load_trainable_state(module, ckpt)  # into the whole module, before FSDP shards it
        algo.load_state_dict(ckpt)
    if cfg.fsdp:
        shard(module, torch.bfloat16 if dtype == "bfloat16" else None)  # nanoalign/fsdp.py
    optimizer = make_optimizer(module, cfg, device)
    if ckpt is not None:
        if cfg.fsdp:
            load_optimizer_state(module, optimizer, ckpt["optimizer"])
        else:
            optimizer.load_state_dict(ckpt["optimizer"])
        start_step = ckpt["step"]
        if start_step % algo.steps_per_rollout and start_step < cfg.max_steps:
            raise ValueError(f"{resume_from} was saved at step {start_step}, inside a rollout of "
                             f"{algo.steps_per_rollout} steps: its samples came from weights that are gone, so the run "
                             "cannot continue exactly from there (periodic checkpoints fall on rollout boundaries)")
        ranks = ckpt.get("rank_rng") or []  # every rank's own RNG (dropout, sampling), saved by a multi-rank run
        set_rng_state(ranks[rank] if len(ranks) == world_size else ckpt["rng"])
        if rank == 0:
            print(f"resumed from {resume_from} at step {start_step}")
    else:
        torch.manual_seed(cfg.seed + rank)  # dropout and sampling differ across ranks

    model = torch.compile(module) if cfg.compile else module  # compile before the DDP wrap (nanoGPT)
    if world_size > 1 and not cfg.fsdp:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_train = sum(p.numel() for p in module.parameters() if p.requires_grad)
        print(f"{algo.name}: {n_train:,} trainable parameters of {sum(p.numel() for p in module.parameters()):,}; "
              f"{world_size} rank(s), grad_accum={grad_accum}, dtype={dtype}{' (attention fp32)' * attention_fp32}"
              f"{' (packed decode)' * packed_decode}, device={device}")
    if rank == 0 and start_step:
        trim_metrics(out_dir / "metrics.jsonl", start_step)  # rows logged after the checkpoint come again
    log_file = open(out_dir / "metrics.jsonl", "a" if start_step else "w") if rank == 0 else None
    reporters = Reporters(cfg.report_to if rank == 0 else "none", out_dir, config_to_dict(cfg), algo.name)

    def save(step):
        if cfg.fsdp:  # gathered on rank 0 into the one ckpt.pt format (nanoalign/fsdp.py)
            state, optimizer_state = full_state(module, optimizer)
            weights = trainable_state(module, cfg, state) if rank == 0 else {"model": {}}
        else:
            weights, optimizer_state = trainable_state(module, cfg), optimizer.state_dict()
        nonfinite = [k for k, v in weights["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if cfg.fsdp and world_size > 1:
            shared = [nonfinite]
            dist.broadcast_object_list(shared, src=0)  # only rank 0 has the gathered weights
            nonfinite = shared[0]
        if nonfinite:  # every rank holds the same weights (or rank 0's verdict), so every rank stops here
            raise RuntimeError(f"step {step}: weights {nonfinite[:3]} are not finite; {out_dir / 'ckpt.pt'} is left "
                               "as it was")
        rngs = [rng_state()]
        if world_size > 1:  # each rank's dropout and sampling stream differs (seed + rank): keep them all
            rngs = [None] * world_size
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            save_checkpoint(out_dir / "ckpt.pt", **weights, optimizer=optimizer_state,
                            step=step, rng=rngs[0], **({"rank_rng": rngs} if world_size > 1 else {}),
                            config=config_to_dict(cfg), algo=algo.name,
                            model_config=asdict(algo.policy.cfg), tokenizer=tokenizer.spec, kind=algo.checkpoint_kind,
                            **algo.state_dict())
        if world_size > 1:
            dist.barrier()

    batches = algo.batches(start_step)
    started, last_record = time.perf_counter(), {}
    sums, n_micro, times = {}, 0, {"data": 0.0, "update": 0.0}
    skipped, skipped_in_a_row = 0, 0  # optimizer steps dropped for a non-finite loss or gradient norm
    no_signal = 0  # optimizer steps not taken because no row had signal (Algorithm.has_signal)
    save_due = False  # a periodic checkpoint waits for the end of the current rollout
    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, disable=rank != 0,
               dynamic_ncols=True, desc=algo.name if out_dir.name == algo.name else f"{algo.name} ({out_dir.name})")
    module.train()
    for step in bar:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_sums, step_times, outcome = train_step(model, module, algo, optimizer, batches, cfg.grad_clip)
        add_metrics(sums, step_sums)
        times = {k: times[k] + step_times[k] for k in times}
        n_micro += grad_accum
        no_signal += outcome == "no_signal"
        skipped_in_a_row = skipped_in_a_row + 1 if outcome == "nonfinite" else 0
        skipped += outcome == "nonfinite"
        if skipped_in_a_row:
            if rank == 0:
                print(f"step {step + 1}: non-finite loss or gradient norm (loss {float(step_sums['loss']):.4g}, "
                      f"grad norm {step_sums['grad_norm'] / grad_accum:.4g}); the update was skipped")
            if skipped_in_a_row >= cfg.max_nonfinite_steps:
                raise RuntimeError(f"{skipped_in_a_row} optimizer steps in a row had a non-finite loss or gradient "
                                   f"norm (the last at step {step + 1}): the run diverged; lower --lr or check the "
                                   f"data. {out_dir / 'ckpt.pt'} holds the last good checkpoint, if any")

        last = step + 1 == cfg.max_steps
        log_now = (step + 1) % cfg.log_interval == 0 or last
        eval_now = bool(cfg.eval_interval) and ((step + 1) % cfg.eval_interval == 0 or last)
        if log_now or eval_now:  # an eval step is logged even between log steps (its row holds the train metrics too)
            record = {"step": step + 1, "lr": lr, **reduce_metrics(sums, n_micro, world_size, device),
                      "skipped_steps": skipped, "no_signal_steps": no_signal}
            record.update({f"time/{k}_s": v / n_micro * grad_accum for k, v in times.items()})  # per optimizer step
            if eval_now:
                module.eval()
                with torch.no_grad(), autocast():
                    record.update(algo.evaluate(model))
                module.train()
            if rank == 0:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
                reporters.log(record)
                shown = ["loss", *algo.key_metrics]
                bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3g}" for k in shown if k in record})
                if eval_now and any(k.startswith("eval/") for k in record):
                    bar.write(f"step {step + 1}: " + summary(record, "eval/"))
            last_record = record
            sums, n_micro, times = {}, 0, {"data": 0.0, "update": 0.0}
        save_due = save_due or bool(cfg.ckpt_interval) and (step + 1) % cfg.ckpt_interval == 0
        boundary = (step + 1) % algo.steps_per_rollout == 0  # resume is exact at a rollout boundary
        if boundary and stop.requested(world_size, device):  # SIGTERM / SIGINT: save, then stop
            save(step + 1)
            bar.close()
            if log_file:
                log_file.close()
            reporters.close()
            raise SystemExit(f"stopped by {stop.name} after step {step + 1}; {out_dir / 'ckpt.pt'} holds it: rerun "
                             "with --resume to continue")
        if save_due and boundary and not last:
            save(step + 1)
            save_due = False
        if stop_after is not None and step + 1 == stop_after:
            save(step + 1)
            bar.close()
            if log_file:
                log_file.close()
            reporters.close()
            return out_dir
    bar.close()
    module.eval()
    algo.finish(model)
    save(cfg.max_steps)
    reporters.close()
    if log_file:
        log_file.close()
        print(f"{algo.name}: {cfg.max_steps - start_step} steps in {time.perf_counter() - started:.0f} s; "
              f"{summary(last_record, '', ('loss', *algo.key_metrics))}; checkpoint {out_dir / 'ckpt.pt'}, "
              f"metrics {out_dir / 'metrics.jsonl'}")
    return out_dir
