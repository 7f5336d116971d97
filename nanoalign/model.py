"""One compact GPT: GPT-2 and the Llama family (Llama 2/3, Qwen2, Mistral, SmolLM) as config switches.

GPT-2:  learned positions, LayerNorm, GELU MLP, biases, tied embeddings.
Llama:  RoPE (configurable theta, Llama-3 rope scaling), RMSNorm, SwiGLU MLP, grouped-query attention
        (n_kv_head < n_head), optional q/k/v bias (Qwen2), untied head.
Attention is F.scaled_dot_product_attention (in fp32 under autocast where set_attention_fp32 asks; a decode step in
fp32 on a CPU is decode_attention's two matmuls). generate() runs a preallocated KV cache over ragged, left-padded
prompts and returns the sampled tokens together with their log-probs, so RL code need not recompute them.
RewardModel (a GPT trunk with a scalar head, trained by algos/rm.py, read by PPO's critic and the RM scorer)
sits at the end. This file imports nothing else of nanoalign.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint

_attention_fp32 = False  # set_attention_fp32
_packed_decode = False  # set_packed_decode


@dataclass
class GPTConfig:
    vocab_size: int = 1024
    block_size: int = 256          # longest sequence (learned positions / RoPE table)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 0             # 0 -> n_head; fewer -> grouped-query attention
    n_embd: int = 128
    head_dim: int = 0              # 0 -> n_embd // n_head
    mlp_hidden: int = 0            # 0 -> 4 * n_embd
    pos: str = "learned"           # "learned" (GPT-2) | "rope" (Llama)
    norm: str = "layernorm"        # "layernorm" | "rmsnorm"
    mlp: str = "gelu"              # "gelu" (tanh approximation, as GPT-2) | "swiglu"
    bias: bool = True              # biases in every linear layer and norm (GPT-2)
    qkv_bias: bool = False         # biases on q, k, v only (Qwen2)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # Llama-3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    dropout: float = 0.0

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.mlp_hidden = self.mlp_hidden or 4 * self.n_embd
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}")
        if self.pos not in ("learned", "rope") or self.norm not in ("layernorm", "rmsnorm") or \
                self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"pos={self.pos!r}, norm={self.norm!r}, mlp={self.mlp!r}: choose pos learned|rope, "
                             "norm layernorm|rmsnorm, mlp gelu|swiglu")


def llama_config(**kw):
    return GPTConfig(**{**dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False), **kw})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in fp32 as Llama does: x / sqrt(mean(x^2) + eps)
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def make_norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rope_inv_freq(cfg):
    """inv_freq_i = theta^(-2i/d), with Llama-3's frequency-dependent scaling when rope_scaling is set."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)  # long wavelengths: divide by factor
    smooth = (old_len / wavelen - low) / (high - low)                            # 0 at low-freq edge, 1 at high-freq edge
    medium = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)


def rotate_half(x):
    # HF's layout: the head dim is split in halves (x1, x2) -> (-x2, x1); HF checkpoints need no permutation
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class KVCache:
    """Preallocated keys/values for every layer: (B, n_kv_head, max_len, head_dim); `length` tokens are filled."""

    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (cfg.n_layer, batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        # uninitialised: update() writes positions [length, length + T) before it returns any of them for reading
        self.k, self.v = torch.empty(shape, device=device, dtype=dtype), torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def update(self, layer, k, v):
        T = k.size(2)
        self.k[layer, :, :, self.length:self.length + T] = k
        self.v[layer, :, :, self.length:self.length + T] = v
        return self.k[layer, :, :, :self.length + T], self.v[layer, :, :, :self.length + T]

    def keep_rows(self, keep):
        """Keep only the batch rows where keep (B,) is True: generate() drops the rows that have finished."""
        self.k, self.v = self.k[:, keep], self.v[:, keep]


def decode_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(hd) + mask) v for ONE query per row against the cached keys, as two batched matmuls:
    what scaled_dot_product_attention computes, but PyTorch's CPU kernel for it (a flash-attention kernel tiled for
    long queries) was measured 2-4x slower at a single query (docs/performance.md). q (B, nh, 1, hd); k, v
    (B, nkv, S, hd) with nh a multiple of nkv (grouped-query: query head h reads kv head h // (nh / nkv), as SDPA's
    enable_gqa); mask (B, 1, 1, S) bool, True where attended, or None. Used for fp32 attention (an fp32 model, or
    set_attention_fp32), where its sums are as exact as the kernel's; in bf16 its scores would be rounded to bf16
    before the softmax, which the kernel avoids, so bf16 attention keeps the kernel."""
    B, nh, _, hd = q.shape
    nkv = k.size(1)
    q = q.reshape(B, nkv, nh // nkv, hd)                                         # the query heads of each kv head
    scores = (q @ k.transpose(-1, -2)).float() * hd ** -0.5                      # (B, nkv, nh / nkv, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))                        # mask (B, 1, 1, S) broadcasts
    y = scores.softmax(-1).to(v.dtype) @ v                                       # (B, nkv, nh / nkv, hd)
    return y.reshape(B, nh, 1, hd)


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        qkv_bias = cfg.bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, rope, mask, cache):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.n_head, c.head_dim).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        if rope is not None:
            cos, sin = rope                                                     # (B, 1, T, hd) each
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                               # (B, nkv, S, hd), S = past + T
        dtype, fp32 = q.dtype, _attention_fp32
        with torch.autocast(x.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            if fp32:  # the bf16 q, k, v upcast exactly; softmax(qk^T)v in fp32, its output rounded back below
                q, k, v = q.float(), k.float(), v.float()
            dropout = c.dropout if self.training else 0.0
            decode = T == 1 and cache is not None and dropout == 0.0                # a step of generate()
            if decode and q.dtype == torch.float32 and x.device.type == "cpu":
                y = decode_attention(q, k, v, mask)                             # (B, nh, 1, hd)
            else:
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=mask is None,
                    dropout_p=dropout, enable_gqa=c.n_kv_head != c.n_head)      # (B, nh, T, hd)
        y = y.to(dtype)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))   # SwiGLU: W2 (silu(W1 x) * W3 x)
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.norm1, self.attn = make_norm(cfg), Attention(cfg, layer)
        self.norm2, self.mlp = make_norm(cfg), MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope, mask, cache):
        x = x + self.drop(self.attn(self.norm1(x), rope, mask, cache))  # pre-norm residual
        return x + self.drop(self.mlp(self.norm2(x)))


@dataclass
class Generation:
    prompt_ids: torch.Tensor    # (B, P) left-padded prompts
    prompt_mask: torch.Tensor   # (B, P) 1 on real prompt tokens
    tokens: torch.Tensor        # (B, N) sampled tokens, pad_id after EOS
    logprobs: torch.Tensor      # (B, N) log-prob of each token under softmax(logits / temperature), 0 on padding
    mask: torch.Tensor          # (B, N) 1 on generated tokens (EOS included)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.activation_checkpointing = False  # a training switch, not the architecture: set_activation_checkpointing
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        if cfg.pos == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(cfg).float(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by 1/sqrt(2 * n_layer)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, attention_mask=None, cache=None):
        """Final-normed hidden states (B, T, C). attention_mask (B, S) marks real tokens of the whole sequence so far
        (cache + idx); None means every token is real (right padding is harmless: attention is causal)."""
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if attention_mask is None:
            pos = torch.arange(past, past + T, device=idx.device).expand(B, T)   # (B, T)
            mask = None if past == 0 else torch.ones(B, 1, T, past + T, dtype=torch.bool, device=idx.device)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]    # left padding shifts positions
            S = attention_mask.size(1)
            if S != past + T:
                raise ValueError(f"attention_mask covers {S} positions, not the {past} cached + {T} new tokens")
            key, query = torch.arange(S, device=idx.device)[None, :], torch.arange(past, S, device=idx.device)[:, None]
            mask = (key <= query)[None] & attention_mask.bool()[:, None, :]     # (B, T, S) causal and not padding
            mask = (mask | (key == query)[None])[:, None]                        # (B, 1, T, S); a pad query sees itself: no NaN
        if pos.max() >= self.cfg.block_size:  # a correctness guard (e.g. a sliding window capped block_size): raise
            raise ValueError(f"sequence of {int(pos.max()) + 1} positions is longer than block_size="
                             f"{self.cfg.block_size}")
        x = self.tok_emb(idx)                                                    # (B, T, C)
        rope = None
        if self.cfg.pos == "learned":
            x = x + self.pos_emb(pos)
        else:
            freqs = pos[..., None].float() * self.inv_freq                       # (B, T, hd/2)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]                     # (B, 1, T, hd)
            rope = (emb.cos().to(x.dtype), emb.sin().to(x.dtype))
        x = self.drop(x)
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for block in self.blocks:
            if recompute:  # keep only the block's input; backward runs its forward again (same dropout masks)
                x = checkpoint(block, x, rope, mask, None, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache)
        if cache is not None:
            cache.length += T
        return self.norm_f(x)

    def forward(self, idx, attention_mask=None, cache=None, return_hidden=False):
        """Logits (B, T, V); or, with return_hidden, the final hidden states (B, T, C) so the caller applies the
        head only where it needs it (nanoalign.logps does, through this forward so DDP and compile still wrap it)."""
        hidden = self.hidden_states(idx, attention_mask, cache)
        return hidden if return_hidden else self.lm_head(hidden)                 # (B, T, C) or (B, T, V)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, eos_id=None, pad_id=0,
                 generator=None):
        """Sample continuations of ragged `prompts` (list of token lists) with a KV cache.
        temperature=0 is greedy (log-probs then come from the unscaled distribution). Rows stop at EOS, and once a
        quarter of the rows still computed have stopped they leave the batch (and the KV cache): a rollout's decode
        steps then cost what its unfinished rows cost. (So the random stream, and the samples of a seed, depend on
        when rows finish; the distribution does not.)
        Under FSDP every rank's forward all-gathers the shards with the other ranks, so the ranks agree on the number
        of decode steps: the fewest max_new_tokens any rank asked for, and no early stop until every rank's rows
        are done (a rank whose rows are done keeps stepping them as padding). Where set_packed_decode asks, the linear
        layers answer from weights prepacked for the call (packed_linears)."""
        with packed_linears(self, len(prompts)) if _packed_decode else contextlib.nullcontext():
            return self._generate(prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, generator)

    def _generate(self, prompts, max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, generator):
        device, B = self.lm_head.weight.device, len(prompts)
        sharded = isinstance(self, FSDPModule) and dist.is_initialized()
        if sharded:
            max_new_tokens = int(_all_ranks(max_new_tokens, dist.ReduceOp.MIN, device))
        P = max(len(p) for p in prompts)
        if P + max_new_tokens > self.cfg.block_size:
            raise ValueError(f"prompt ({P}) + max_new_tokens ({max_new_tokens}) exceeds block_size={self.cfg.block_size}")
        prompt_ids = torch.full((B, P), pad_id, dtype=torch.long, device=device)
        attn = torch.zeros(B, P + max_new_tokens, dtype=torch.long, device=device)  # grows as tokens are appended
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError("empty prompt: prepend a BOS/EOS token")
            prompt_ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, P - len(p):P] = 1
        autocast = torch.is_autocast_enabled(device.type)  # the cache holds k, v in the dtype attention reads them
        cache_dtype = torch.get_autocast_dtype(device.type) if autocast else self.lm_head.weight.dtype
        cache_dtype = torch.float32 if _attention_fp32 else cache_dtype  # no upcast of the whole cache per step
        cache = KVCache(self.cfg, B, P + max_new_tokens, device, cache_dtype)
        tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, max_new_tokens, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        # the step's (B, V) fp32 logits and their exponentials live in two buffers reused by every step: a fresh
        # tensor of that size per step page-faults its memory in again, which cost more than the arithmetic on it
        scaled = torch.empty(B, self.cfg.vocab_size, device=device)
        weights = torch.empty_like(scaled)
        last = self(prompt_ids, attn[:, :P], cache, return_hidden=True)[:, -1]   # (B, C): the head runs on the
        logits = self.lm_head(last)                                               # last prompt position only (B, V)
        rows = torch.arange(B, device=device)  # the rows still stepped, in the order of the cache and the logits
        for t in range(max_new_tokens):
            n = len(rows)
            step, step_weights = scaled[:n], weights[:n]                          # (n, V) views of the buffers
            step.copy_(logits)                                                    # in fp32
            if temperature not in (0, 1):
                step.div_(temperature)
            top = step.amax(-1, keepdim=True)                                     # (n, 1)
            torch.sub(step, top, out=step_weights).exp_()                         # (n, V) unnormalised probabilities
            log_total = step_weights.sum(-1, keepdim=True).log_() + top           # (n, 1) log-sum-exp of the logits
            if temperature > 0:
                filtered = top_k or top_p < 1.0
                nxt = sample_categorical(filter_logits(step, top_k, top_p).softmax(-1) if filtered else step_weights,
                                         generator)
            else:
                nxt = step.argmax(-1)
            stepped_done = done[rows]                                             # (n,)
            tokens[rows, t] = torch.where(stepped_done, pad_id, nxt)
            logp = step.gather(1, nxt[:, None]) - log_total                       # (n, 1) log-prob of the token drawn
            logprobs[rows, t] = torch.where(stepped_done, 0.0, logp[:, 0])
            attn[:, P + t] = 1
            if eos_id is not None:
                stepped_done = stepped_done | (nxt == eos_id)
                done[rows] = stepped_done
            finished = bool(done.all())
            if sharded:
                finished = bool(_all_ranks(finished, dist.ReduceOp.MIN, device))  # every rank's rows are done
            if finished or t == max_new_tokens - 1:
                tokens, logprobs = tokens[:, :t + 1], logprobs[:, :t + 1]
                break
            n_done = int(stepped_done.sum()) if eos_id is not None else 0
            if 0 < n_done < n and 4 * n_done >= n:  # a quarter of the stepped rows finished: stop computing them
                rows = rows[~stepped_done]
                cache.keep_rows(~stepped_done)
            logits = self(tokens[rows, t:t + 1], attn[rows, :P + t + 1], cache)[:, -1]
        # a row's tokens are valid up to and including its first EOS
        is_eos = (tokens == eos_id) if eos_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0                 # strictly after the first EOS
        return Generation(prompt_ids, attn[:, :P], tokens, logprobs, (~after_eos).float())


def _all_ranks(value, op, device):
    """`value` (a number or bool) reduced over the ranks by `op` (dist.ReduceOp.MIN: the smallest; for bools: all)."""
    reduced = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(reduced, op=op)
    return reduced.item()


def sample_categorical(probs, generator=None, block=256):
    """One index per row of probs (B, V) (unnormalised is fine), drawn by inverse CDF: the first j with
    cdf_j > u * cdf_V, u ~ U[0, 1). The distribution of torch.multinomial(probs, 1) from B uniforms instead of
    multinomial's B x V exponentials (that draw was a fifth of a GPT-2 rollout's time on a CPU). In two levels, so
    that no (B, V) cumulative sum is built: the cdf over the totals of blocks of `block` columns finds the block that
    u * cdf_V falls in, then the cdf inside that one block finds the column (the same index as one cdf over all V,
    up to rounding). A zero-probability j is never the first index past the target, since its cdf equals its
    predecessor's (in either level). The cdfs are float64 so that rounding cannot shift mass between columns; each
    block's total is summed in the probabilities' dtype (a float64 sum over a strided view was a copy as slow as
    the rest of the decode step), an error of ~1e-7 of the block's mass, the size of the fp32 probabilities' own.
    (Its random stream differs from multinomial's: same seed, different samples.)"""
    B, V = probs.shape
    full = V - V % block                                                          # columns in whole blocks
    totals = [probs[:, :full].unflatten(1, (-1, block)).sum(-1)] if full else []  # (B, V // block)
    if full < V:
        totals.append(probs[:, full:].sum(-1, keepdim=True))                      # the last, shorter block
    cdf = torch.cat(totals, 1).double().cumsum(-1)                                # (B, n_blocks)
    total = cdf[:, -1:]                                                           # (B, 1)
    u = torch.rand(B, 1, dtype=torch.float64, device=probs.device, generator=generator)
    x = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # < total even after rounding
    j = torch.searchsorted(cdf, x, right=True)                                    # (B, 1) first block with cdf > x
    before = torch.where(j > 0, cdf.gather(1, (j - 1).clamp(min=0)), 0.0)         # (B, 1) mass of blocks before j
    columns = j * block + torch.arange(block, device=probs.device)                # (B, block) block j's columns
    inside = torch.where(columns < V, probs.gather(1, columns.clamp(max=V - 1)), 0.0).double().cumsum(-1)
    rest = torch.minimum(x - before, torch.nextafter(inside[:, -1:], torch.zeros_like(before)))  # in [0, block mass)
    return (j * block + torch.searchsorted(inside, rest, right=True))[:, 0]      # (B,) first column with cdf > x


def filter_logits(logits, top_k=0, top_p=1.0):
    """Set logits outside the top-k / nucleus (top-p) set to -inf. logits (B, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                   # (B, 1) k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p                                   # mass before this token already > p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def last_token_index(attention_mask):
    """Index of the last real token of each row, for right, left or both-sided padding. (B, T) -> (B,)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)  # (T,)
    return (positions * attention_mask.long()).argmax(dim=1)             # largest t with mask 1


def set_activation_checkpointing(model, enabled=True):
    """Activation (gradient) checkpointing for every GPT inside `model` (a policy, a critic, a reward trunk): each
    block keeps only its input during a training forward and recomputes its activations in backward
    (torch.utils.checkpoint, non-reentrant; dropout replays the same masks). Gradients are unchanged
    (tests/test_model.py); memory for activations drops from every block's intermediates to one tensor per block, for
    about one more forward of compute. No effect under no_grad or with a KV cache (generation)."""
    for module in model.modules():
        if isinstance(module, GPT):
            module.activation_checkpointing = enabled
    return model


def set_attention_fp32(enabled):
    """Run scaled_dot_product_attention in fp32 (autocast off inside it) in every model of this process, and keep
    generate()'s KV cache in fp32; returns the previous setting. A process-wide kernel choice, like torch.backends'
    flags, so that a policy, its frozen reference and its scorers always attend alike. The inputs are the bf16 q, k,
    v that autocast's projections make, upcast exactly, and the output is rounded back to their dtype: the change is
    attention's own arithmetic only (fp32 sums where the bf16 kernel rounds). It is for CPUs whose bf16 attention
    kernel is slower than the fp32 one (precision.fp32_attention_is_faster measures it; docs/performance.md); an fp32
    model outside autocast computes exactly as without it."""
    global _attention_fp32
    previous, _attention_fp32 = _attention_fp32, bool(enabled)
    return previous


@contextlib.contextmanager
def packed_linears(model, rows):
    """Inside, every fp32 nn.Linear of `model` on a CPU answers inputs of at most `rows` rows (a decode step) from a
    copy of its weight prepacked by oneDNN (torch.ops.mkldnn's private prepacked-linear ops, which PyTorch's own
    inductor CPU backend calls) instead of F.linear's GEMM; for no-grad work outside autocast only (otherwise, and under FSDP, nothing changes).
    Outputs differ from F.linear's by summation order (~1e-6 relative). The copies live for the block (generate()
    packs once per call: the weights change between rollouts) and double the weights' memory meanwhile."""
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32 and
               m.weight.device.type == "cpu"]
    if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or isinstance(model, FSDPModule):
        linears = []
    for m in linears:
        m.forward = _packed_forward(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows), rows)
    try:
        yield
    finally:
        for m in linears:
            del m.forward  # nn.Linear's own forward again


def _packed_forward(linear, packed, rows):
    def forward(x):  # x W^T + b with W in oneDNN's blocked layout
        if x.numel() > rows * linear.in_features:  # more rows than packed for (a prefill): F.linear, faster there
            return F.linear(x, linear.weight, linear.bias)
        return torch.ops.mkldnn._linear_pointwise(x, packed, linear.bias, "none", [], "")
    return forward


def set_packed_decode(enabled):
    """Let generate() run its linear layers on prepacked weights (packed_linears) in every model of this process;
    returns the previous setting. For CPUs where that kernel is measured faster at decode shapes
    (precision.packed_decode_is_faster; docs/performance.md): there PyTorch's default fp32 GEMM at a decode step's
    few rows ran well below its large-matmul rate."""
    global _packed_decode
    previous, _packed_decode = _packed_decode, bool(enabled) and torch.backends.mkldnn.is_available()
    return previous


class RewardModel(nn.Module):
    """backbone: a GPT (its hidden states; its lm_head is unused). forward(input_ids, attention_mask) -> (B,)
    normalised reward read at the last real token; token_values(...) -> (B, T) the head at every position (a
    critic initialised from the reward model reads it there)."""

    def __init__(self, backbone: GPT, readout: str = "eos"):
        super().__init__()
        if readout not in ("eos", "sum"):
            raise ValueError(f"rm_readout={readout!r}: choose eos or sum")
        self.backbone, self.readout = backbone, readout
        d = backbone.cfg.n_embd
        self.head = nn.Linear(d, 1)
        nn.init.normal_(self.head.weight, std=1 / (d + 1) ** 0.5)       # lm-human-preferences' init
        nn.init.zeros_(self.head.bias)
        if not backbone.cfg.tie_embeddings:
            backbone.lm_head.requires_grad_(False)  # unused: a grad-less trainable weight would stall DDP's reducer
        self.register_buffer("reward_mean", torch.zeros(()))                  # normalisation, set by normalise()
        self.register_buffer("reward_std", torch.ones(()))

    def token_values(self, input_ids, attention_mask=None):
        """(B, T): at each position t the normalised score the model would give if the sequence ended at t."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        h = self.backbone(input_ids, attention_mask, return_hidden=True)  # (B, T, C), through forward (FSDP hooks)
        raw = self.head(h).squeeze(-1).float()                           # (B, T)
        if self.readout == "sum":
            raw = (raw * attention_mask).cumsum(dim=1)                   # sum_{s <= t} head(h_s) over real tokens
        return (raw - self.reward_mean) / self.reward_std

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        values = self.token_values(input_ids, attention_mask)            # (B, T)
        return values.gather(1, last_token_index(attention_mask)[:, None])[:, 0]  # (B,) at the EOS

    @torch.no_grad()
    def normalise(self, mean, std):
        """Store statistics of the RAW rewards so that forward() returns (raw - mean) / std."""
        self.reward_mean.fill_(mean)
        self.reward_std.fill_(std)

    @torch.no_grad()
    def fold_normalisation(self):
        """Fold (raw - mean) / std into the head (w / std, (b - mean) / std) and reset the statistics to 0 / 1: the
        same outputs, but gradients see normalised units (for a critic initialised from this model). Under the sum
        readout the mean is subtracted once from a sum of T terms, so only the std is folded and the mean kept."""
        self.head.weight.div_(self.reward_std)
        self.head.bias.div_(self.reward_std)
        if self.readout == "eos":
            self.head.bias.sub_(self.reward_mean / self.reward_std)     # (b - mean) / std
            self.normalise(0.0, 1.0)
        else:
            self.normalise(self.reward_mean / self.reward_std, 1.0)     # (sum - mean) / std = sum / std - mean / std
