"""The tests' torchrun entry point for generate() under FSDP: a tiny GPT sharded with nanoalign.fsdp.shard, each
rank with its own prompts, EOS and max_new_tokens (rank 0's rows stop at their first token, rank 1 asks for more
tokens and never sees EOS), then one more forward; each rank writes what it generated to <out>/rank<r>.json."""
import json
import sys

import torch
import torch.distributed as dist

from nanoalign.fsdp import shard
from nanoalign.model import GPT, GPTConfig

if __name__ == "__main__":
    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32)).eval()
    shard(model)
    prompts = [[5, 6, 7], [9, 10]] if rank == 0 else [[1, 2, 3, 4]]
    with torch.no_grad():
        greedy_first = model(torch.tensor([prompts[0]]))[0, -1].argmax().item()
        eos_id = greedy_first if rank == 0 else None
        gen = model.generate(prompts, 6 if rank == 0 else 10, temperature=0.0, eos_id=eos_id)
        after = model(torch.tensor([[1, 2, 3]]))[0, -1].tolist()  # the shards are gathered alike on every rank
    result = dict(prompts=prompts, eos_id=eos_id, tokens=gen.tokens.tolist(), mask=gen.mask.tolist(), after=after)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.barrier()  # neither rank tears its connections down while the other still uses them
    dist.destroy_process_group()
