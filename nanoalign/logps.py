"""The one log-prob helper every algorithm uses: shift, gather, mask, sum and count of completion tokens.

Two implementations of the same numbers (tests/test_speed_equivalence.py checks values and gradients agree):
  batch_logps_plain  the readable reference: logits at every position (B, T, V), then cross_entropy.
  batch_logps        what training runs: the model returns hidden states, and the vocabulary projection,
                     log-softmax and gather run only at completion positions, a chunk of rows at a time, with
                     the chunk's logits recomputed in backward (CompletionLogps). No (B, T, V) tensor exists in
                     any dtype, so memory no longer grows with B * T * vocab (150k for Qwen) and the lm_head
                     matmul skips prompt and padding positions. It falls back to the plain version for models
                     whose lm_head is not a bias-free nn.Linear (e.g. a LoRA-wrapped head). Forward hooks on
                     lm_head do not run in the fused version (the head's matmul happens here, not in a module).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 25  # logits per chunk (rows x vocab): 128 MB in float32


def token_logps(logits, targets):
    """log p(target) per position. logits (B, T, V), targets (B, T) -> (B, T) float32 (plain version)."""
    B, T, V = logits.shape
    return -F.cross_entropy(logits.reshape(B * T, V).float(), targets.reshape(B * T), reduction="none").view(B, T)


def batch_logps_plain(model, input_ids, loss_mask, attention_mask=None, temperature=1.0):
    """Reference version of batch_logps: full logits, then token_logps on every position."""
    logits = model(input_ids, attention_mask)[:, :-1]          # (B, T-1, V): position t predicts token t+1
    if temperature != 1.0:
        logits = logits / temperature                          # the sampling distribution of a rollout
    mask = loss_mask[:, 1:].float()                            # (B, T-1)
    per_token = token_logps(logits, input_ids[:, 1:]) * mask   # (B, T-1)
    return per_token.sum(-1), mask.sum(-1), per_token


class CompletionLogps(torch.autograd.Function):
    """out_i = log softmax(z_i)[t_i] with z_i = h_i W^T / temperature, for N rows of h, `chunk` rows at a time.

    Backward recomputes each chunk's logits instead of saving them: d out_i / d z_ij = 1[j = t_i] - softmax(z_i)_j,
    so dL/dz = g_i (onehot(t_i) - p_i) / temperature, dL/dh = dL/dz W and dL/dW = dL/dz^T h (summed over chunks).
    Except the LAST chunk's logits, which forward keeps and backward consumes first: backward would allocate a
    chunk of logits at its start anyway, so the peak memory is unchanged, and when all N rows fit in one chunk (a
    DPO batch of GPT-2 up to 667 completion tokens) no logits are recomputed at all (2 matmuls in backward, not 3).
    Memory: O(chunk x V) for any N. Cost: one more (n x C x V) matmul in backward per chunk but the last.
    Mixed precision: `weight` is the head's own (fp32 master) weight and `dtype` the matmul dtype (bf16 under
    autocast, None otherwise): the cast happens once here and dL/dW is summed in fp32 and returned in the master's
    dtype, instead of autograd casting a bf16 dL/dW back to fp32 (two (V x C) copies and a rounding per backward).
    A frozen head (LoRA, or a bf16 inference copy) gets no dL/dW at all: that (V x n x C) matmul per chunk is skipped.
    """

    @staticmethod
    def forward(ctx, hidden, master_weight, targets, temperature, chunk, dtype):
        weight = master_weight if dtype is None else master_weight.to(dtype)  # (V, C) in the matmul dtype
        hidden = hidden.to(weight.dtype)
        N = hidden.shape[0]                                                    # hidden (N, C), weight (V, C)
        out = torch.empty(N, device=hidden.device, dtype=torch.float32)       # (N,)
        lse = torch.empty(N, device=hidden.device, dtype=torch.float32)       # (N,) log sum_j exp(z_ij)
        for s in range(0, N, chunk):
            z = (hidden[s:s + chunk] @ weight.T).float()                       # (n, V) this chunk's logits
            if temperature != 1.0:
                z.div_(temperature)
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None])[:, 0] - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk, ctx.master_dtype = temperature, chunk, master_weight.dtype
        ctx.last_logits = z if N > 0 else None                                 # (n, V) the last chunk's logits
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden, grad_weight = torch.empty_like(hidden), None               # (N, C); (V, C) summed in fp32
        wants_weight_grad = ctx.needs_input_grad[1]                              # False for a frozen head
        saved, ctx.last_logits = ctx.last_logits, None                         # consumed once (in place below)
        for s in reversed(range(0, hidden.shape[0], ctx.chunk)):               # the last chunk first: it is saved
            h, t = hidden[s:s + ctx.chunk], targets[s:s + ctx.chunk]
            g = (grad_out[s:s + ctx.chunk] / ctx.temperature)[:, None]         # (n, 1) g_i / temperature
            if saved is not None:
                z, saved = saved, None                                         # (n, V) the forward's logits
            else:
                z = (h @ weight.T).float()                                     # (n, V) recomputed logits
                if ctx.temperature != 1.0:
                    z.div_(ctx.temperature)
            dz = z.sub_(lse[s:s + ctx.chunk, None]).exp_().mul_(-g)            # -g_i p_ij / temperature, in place
            dz.scatter_add_(1, t[:, None], g)                                  # + g_i / temperature at j = t_i
            dz = dz.to(hidden.dtype)                                           # (n, V) dL/d(h W^T)
            grad_hidden[s:s + ctx.chunk] = dz @ weight
            if wants_weight_grad:
                part = dz.T @ h                                                # (V, C) this chunk's dL/dW
                grad_weight = part.float() if grad_weight is None else grad_weight.add_(part)  # fp32 += bf16
        if not wants_weight_grad:
            return grad_hidden, None, None, None, None, None
        if grad_weight is None:                                                # no completion tokens at all
            grad_weight = torch.zeros(weight.shape, device=weight.device)
        return grad_hidden, grad_weight.to(ctx.master_dtype), None, None, None, None


def hidden_states_and_head(model, input_ids, attention_mask):
    """(hidden states (B, T, C) before the head, the head), through `model`'s own forward (return_hidden=True) so
    DDP's gradient hooks and torch.compile still apply to a wrapped model. None if the head is not a bias-free
    nn.Linear (e.g. a LoRA-wrapped or biased head): then the plain version runs."""
    core = getattr(model, "module", model)                       # DDP wraps in .module
    core = getattr(core, "_orig_mod", core)                      # torch.compile wraps in ._orig_mod
    head = getattr(core, "lm_head", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    return model(input_ids, attention_mask, return_hidden=True), head


def batch_logps(model, input_ids, loss_mask, attention_mask=None, temperature=1.0, fused=True):
    """Sum and count of completion-token log-probs per row; chosen and rejected rows go through in ONE forward.

    input_ids, loss_mask: (B, T), loss_mask[:, t] = 1 where token t is a completion token (EOS included).
    Returns logps (B,), counts (B,), token_logps (B, T-1) where token_logps[:, t] = log p(input_ids[:, t+1]),
    zero where masked. A fully masked row gives logps = 0 and counts = 0 (average with counts.clamp(min=1): no NaN).
    Same values as batch_logps_plain; logits exist only for completion positions, one chunk at a time.
    fused=False runs batch_logps_plain instead (the run config's fused_logps: debugging, the benchmark's ablation).
    """
    found = hidden_states_and_head(model, input_ids, attention_mask) if fused else None
    if found is None:
        return batch_logps_plain(model, input_ids, loss_mask, attention_mask, temperature)
    hidden, head = found                                       # (B, T, C)
    mask = loss_mask[:, 1:].float()                            # (B, T-1)
    where = mask != 0                                          # completion positions t predict token t+1
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None  # autocast's for lm_head
    rows = hidden[:, :-1][where]                               # (N, C), N = number of completion tokens
    chunk = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    values = CompletionLogps.apply(rows, head.weight, input_ids[:, 1:][where], float(temperature), chunk, dtype)  # (N,)
    per_token = torch.zeros(mask.shape, device=mask.device, dtype=values.dtype).index_put((where,), values) * mask
    return per_token.sum(-1), mask.sum(-1), per_token          # (B,), (B,), (B, T-1)
