"""What a bf16 run means in nanoalign: training under autocast on fp32 master weights, no-grad models stored in bf16.

Training keeps fp32 weights and optimizer state and runs its forwards under torch.autocast (one region per optimizer
step, trainer.train_step), so checkpoints stay fp32. Models that only ever answer under no_grad (the frozen
reference, a reward model, an LLM judge) are cast ONCE with `cast_for_inference_`: the weights autocast would cast
on every call, those of nn.Linear layers (the head included, untied from the embedding), are stored in bf16; norms
and embeddings keep their dtype. Under the same autocast such a model computes exactly what its fp32 original
computes (the casts are the same roundings; tests/test_mixed_precision.py checks bit equality), without re-casting
its weights per call, and with half their memory. `inference_autocast` is the context they answer in.
`cast_frozen_linears_` does the same to the frozen base of a LoRA run, whose adapters and heads keep training in fp32:
its checkpoint stores only those, so the fp32 base is read again from init_from when it is exported or merged.

`bf16_is_faster` is what dtype="auto" asks on a CPU: bf16 matmuls are fast only on some CPUs (AVX512-BF16, AMX),
and on a small model the casts around them cost more than they save, so it times the model's own MLP matmul in
both dtypes (docs/performance.md has the measurements). `fp32_attention_is_faster` asks the same of attention: on
some CPUs PyTorch's bf16 scaled_dot_product_attention is slower than its fp32 kernel (its backward and the decode
step of generate() most), and model.set_attention_fp32 then runs attention alone in fp32 inside the bf16 autocast.
`packed_decode_is_faster` asks whether generate()'s fp32 linear layers run faster on weights prepacked by oneDNN
(model.set_packed_decode) than in PyTorch's default GEMM at a decode step's few rows.
"""
import contextlib
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanoalign.model import decode_attention, packed_linears


def cast_for_inference_(model, dtype):
    """Store every nn.Linear weight and bias of `model` in `dtype`, in place (a tied head gets its own copy, the
    embedding keeps its dtype); freeze it and put it in eval mode. Returns `model`."""
    model.requires_grad_(False).eval()
    if dtype is None:
        return model
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().to(dtype), requires_grad=False)
            if module.bias is not None:
                module.bias = nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
    return model


def cast_frozen_linears_(model, dtype):
    """Store the frozen weights and biases of every linear layer of `model` in `dtype`, in place: nn.Linear and any
    module with `in_features` (a LoRALinear's base weight), but never a parameter that trains (the LoRA A and B, value
    and reward heads) nor an embedding. A tied head gets its own copy. Under a `dtype` autocast the layers compute
    exactly what they computed before (autocast made the same cast on every call). Returns the number of elements
    cast."""
    cast = 0
    for module in model.modules():
        if not (isinstance(module, nn.Linear) or hasattr(module, "in_features")):
            continue
        for name in ("weight", "bias"):
            param = getattr(module, name, None)
            if isinstance(param, nn.Parameter) and not param.requires_grad and param.dtype != dtype:
                setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
                cast += param.numel()
    return cast


def inference_autocast(model, dtype):
    """The autocast context a model cast by cast_for_inference_(model, dtype) answers in (a no-op for None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


def _best_seconds(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bf16_is_faster(n_embd, hidden=None, rows=512, repeats=5, margin=1.2):
    """True when a (rows x n_embd) @ (n_embd x hidden) matmul, the model's MLP shape, runs `margin` times faster
    in bf16 than in fp32 on this CPU (the rest of a step gains less than its matmuls, hence the margin)."""
    hidden = hidden or 4 * n_embd
    timings = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(rows, n_embd, dtype=dtype), torch.randn(n_embd, hidden, dtype=dtype)
        a @ b  # warm-up: the first call picks a kernel
        timings[dtype] = _best_seconds(lambda: a @ b, repeats)
    return timings[torch.float32] >= margin * timings[torch.bfloat16]


def fp32_attention_is_faster(n_head, head_dim, repeats=3, margin=1.2):
    """True when attention at the model's head shape runs `margin` times faster in fp32 (bf16 inputs upcast, output
    rounded back, as model.set_attention_fp32 does) than in bf16 on this CPU, summed over the two places it runs: a
    training forward + backward (8 rows of 128 causal tokens) and a decode step of generate() (64 rows, one query
    against 64 keys that the KV cache holds in the dtype attention reads; in fp32 the path model.decode_attention)."""
    timings = {}
    for upcast in (False, True):
        wide = torch.float32 if upcast else torch.bfloat16
        q, k, v = (torch.randn(8, n_head, 128, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        step_q = torch.randn(64, n_head, 1, head_dim, dtype=torch.bfloat16)
        cached_k, cached_v = (torch.randn(64, n_head, 64, head_dim, dtype=wide) for _ in range(2))
        mask = torch.ones(64, 1, 1, 64, dtype=torch.bool)

        def train():
            y = F.scaled_dot_product_attention(q.to(wide), k.to(wide), v.to(wide), is_causal=True)
            y.to(torch.bfloat16).sum().backward()

        def decode():  # the two paths Attention takes for one query: the kernel in bf16, decode_attention in fp32
            attend = decode_attention if upcast else F.scaled_dot_product_attention
            attend(step_q.to(wide), cached_k, cached_v, mask).to(torch.bfloat16)

        train(), decode()  # warm-up: the first calls pick kernels
        timings[upcast] = _best_seconds(train, repeats) + _best_seconds(decode, repeats)
    return timings[False] >= margin * timings[True]


def packed_decode_is_faster(n_embd, hidden=None, rows=64, repeats=5, margin=1.1):
    """True when fp32 (rows x n_embd) @ (n_embd x hidden) products, the MLP's shape at a decode step of generate(),
    run `margin` times faster on weights prepacked by oneDNN (model.packed_linears) than through F.linear on this
    CPU. Timed over distinct weights, 64 MB together (more than a CPU cache holds; at most 16 weights, so a small
    model's probe stays quick), as a decode step streams the model's weights from memory (with one weight warm in
    cache the two kernels ran closer than they do in generate()), the two alternating so that a slow moment of a
    shared machine slows both (docs/performance.md)."""
    hidden = hidden or 4 * n_embd
    layers = nn.ModuleList(nn.Linear(n_embd, hidden) for _ in range(min(16, max(2, 2 ** 24 // (n_embd * hidden)))))
    x = torch.randn(rows, n_embd)

    def chain(packed):
        for layer in layers:  # inside packed_linears a layer's own forward is the packed one; F.linear is the plain
            layer(x) if packed else F.linear(x, layer.weight, layer.bias)

    plain = packed = float("inf")
    with torch.no_grad(), packed_linears(layers, rows):
        chain(False), chain(True)  # warm-up: the first calls pick kernels and touch the packed copies
        for _ in range(repeats):
            plain = min(plain, _best_seconds(lambda: chain(False), 1))
            packed = min(packed, _best_seconds(lambda: chain(True), 1))
    return plain >= margin * packed
