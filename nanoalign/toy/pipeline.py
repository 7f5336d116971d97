"""The toy world's default run: build (once, cached) the corpus, base model, SFT model and annotated data, point a
run at them, and evaluate the result. train.py calls `prepare` when no --data is given and `evaluate_run` after;
`python -m nanoalign.toy.pipeline <run_dir>` evaluates a run trained with an explicit --data on the toy world.

Stages, each in its own folder of the cache dir (out/toy, or $NANOALIGN_TOY_DIR), rebuilt only when missing or
when its recipe changed (a stamp.json holds a hash of the recipe fields it used and of the stages before it):
  corpus/       pretrain.jsonl {"text"} (reviews for the base model); sft.jsonl {"prompt","completion"} (held-out
                reviews cut after their first 2-8 words); eval_prompts.jsonl {"prompt"} (other held-out reviews)
  base/         a tiny GPT pretrained from scratch on pretrain.jsonl (the SFT algorithm on plain text)
  sft/          the base model fine-tuned on sft.jsonl (the reference policy pi_ref of every later run)
  annotations/  for each SFT prompt, several completions sampled from the SFT model at temperature 1, scored by
                the gold reward and labelled by the simulated annotators of world.py:
                prefs.jsonl {"prompt","chosen","rejected"} (Bradley-Terry draws), binary.jsonl {"prompt",
                "completion","label"} (thumbs up/down), prompts.jsonl {"prompt"} (online algorithms)
  listwise/     (runs of a listwise algorithm only: PRO, RRHF, LiPO) lists.jsonl {"prompt","completions","scores"}:
                listwise_k completions per annotation prompt, sampled exactly as annotations/ samples (same seed: with
                listwise_k = completions_per_prompt they are the very completions the pairs were drawn from), scored
                by a noisy annotator, score = gold reward + Gumbel(0, tau) noise (world.score_list: every pair of a
                list is then ordered as the pairwise annotators would order it)
  rm/           (runs scored by a reward model only: PPO) prefs.jsonl = annotations/prefs.jsonl + the same labelling
                of more SFT prompts (Recipe.rm_prompts), and the proxy reward model trained on it
As in the DPO paper's IMDb experiment (appendix C.1) the preference prompts are the SFT prompts and every prompt
gets 4 completions and all 6 of their pairs; departure: our labels are noisy draws, not the classifier's argmax.

Under torchrun the training stages run on every rank (train() does the DDP); corpus and annotation are written by
rank 0 while the others wait at a barrier. What the toy world is and what every algorithm reaches on it:
docs/toy-world.md.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

from nanoalign.algos import algo_config, get_algorithm
from nanoalign.algos.sft import SFT
from nanoalign.checkpoint import load_checkpoint
from nanoalign.loading import model_from_checkpoint
from nanoalign.config import load_config
from nanoalign.data import read_jsonl
from nanoalign.toy.evaluate import completion_text, evaluate, format_table, model_sampler, sample_completions
from nanoalign.toy.world import (TAU, binary_feedback, gold_reward, is_grammatical, label_pairs, make_corpus,
                                 score_list, split_prompt, write_jsonl)
from nanoalign.trainer import resolve_device, setup_distributed, train

VERSION = 1  # bump when a stage's code changes what it writes: every cache is rebuilt


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the toy world's models and data (the DPO run itself is configured by TrainConfig)."""
    seed: int = 0
    # corpus: reviews for pretraining, for SFT pairs (and the annotation prompts), for evaluation prompts
    n_pretrain: int = 20000
    n_sft: int = 4000
    n_eval: int = 256
    # base model: GPT-2 style, trained from scratch on the toy tokenizer (every word is one token)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    base_steps: int = 1000
    base_batch: int = 64
    base_lr: float = 2e-3
    # SFT model: the base model fine-tuned on the prompt/continuation pairs
    sft_steps: int = 100
    sft_batch: int = 32
    sft_lr: float = 3e-4
    # annotation: completions of the SFT model for the first n_annotate SFT prompts
    n_annotate: int = 1500
    completions_per_prompt: int = 4
    pairs_per_prompt: int = 6
    tau: float = TAU
    max_new_tokens: int = 40  # also the evaluation's sampling budget
    micro_batch_size: int = 32
    # proxy reward model (--algo=rm from the SFT model), built only for runs that need one (PPO). Its comparisons
    # are prefs.jsonl plus the same labelling of SFT prompts [n_annotate:rm_prompts] (InstructGPT, too, trains its
    # RM on a comparison set of its own), because on prefs.jsonl alone the RM fitted the annotators' noise and
    # stopped well short of the gold direction. Accuracies of each choice: docs/ppo.md
    rm_prompts: int = 4000
    rm_steps: int = 3000  # 4 epochs of the ~24000 pairs
    rm_batch: int = 32
    rm_lr: float = 5e-4
    rm_readout: str = "sum"  # algos/rm.py: the head summed over every token, since the gold reward is a sum over words
    # listwise data (PRO, RRHF, LiPO), built only for runs that need it: listwise_k completions per annotation prompt
    listwise_k: int = 4


RECIPES = {
    "default": Recipe(),
    # about a minute, for the slow test: a weaker base model, fewer preference pairs
    "small": Recipe(n_pretrain=6000, base_steps=300, n_annotate=600),
    # seconds instead of minutes, for tests: the models learn little
    "tiny": Recipe(n_pretrain=256, n_sft=64, n_eval=16, n_layer=1, n_head=2, n_embd=32, base_steps=4, base_batch=16,
                   sft_steps=2, sft_batch=16, n_annotate=16, completions_per_prompt=3, pairs_per_prompt=2,
                   max_new_tokens=24, micro_batch_size=16, rm_steps=2, rm_batch=16, listwise_k=3),
}
STAGE_FIELDS = {  # the recipe fields each stage depends on (besides the stages before it)
    "corpus": ("seed", "n_pretrain", "n_sft", "n_eval"),
    "base": ("seed", "n_layer", "n_head", "n_embd", "block_size", "base_steps", "base_batch", "base_lr",
             "micro_batch_size"),
    "sft": ("seed", "sft_steps", "sft_batch", "sft_lr", "micro_batch_size"),
    "annotations": ("seed", "n_annotate", "completions_per_prompt", "pairs_per_prompt", "tau", "max_new_tokens"),
    "rm": ("seed", "rm_prompts", "rm_steps", "rm_batch", "rm_lr", "rm_readout", "micro_batch_size"),
    "listwise": ("seed", "n_annotate", "listwise_k", "tau", "max_new_tokens"),
}
DATA_FILES = {"text": "corpus/pretrain.jsonl", "sft": "corpus/sft.jsonl", "preference": "annotations/prefs.jsonl",
              "binary": "annotations/binary.jsonl", "prompt": "annotations/prompts.jsonl",
              "listwise": "listwise/lists.jsonl"}


def toy_dir() -> Path:
    return Path(os.environ.get("NANOALIGN_TOY_DIR", "out/toy"))


def default_recipe() -> Recipe:
    """RECIPES[$NANOALIGN_TOY_RECIPE], "default" when unset."""
    name = os.environ.get("NANOALIGN_TOY_RECIPE", "default")
    if name not in RECIPES:
        raise ValueError(f"NANOALIGN_TOY_RECIPE={name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


def barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def build_lock(root: Path, rank: int):
    """An exclusive lock on <root>/.lock held by rank 0 while stages are checked and built, so two runs started
    on one cache dir at once do not build it twice or read a half-written stage: the second waits, then reuses."""
    if rank != 0:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        yield


def stage_key(stage: str, recipe: Recipe, upstream: str = "") -> str:
    fields = {name: getattr(recipe, name) for name in STAGE_FIELDS[stage]}
    text = json.dumps({"version": VERSION, "stage": stage, "fields": fields, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


MARKER = ".nanoalign-stage"  # written first into every stage folder: only such folders are ever deleted


def run_stage(directory: Path, key: str, build, rank: int, every_rank: bool, title: str = "") -> float | None:
    """Build `directory` unless its stamp matches `key`; returns the seconds spent, None when cached.
    `build(directory)` runs on every rank (training) or on rank 0 only (writing files). A stale stage folder is
    deleted first, but only one the pipeline made (it holds MARKER); an interrupted build of the same stage (its
    MARKER names this key) is kept, so a training stage resumes from its last checkpoint."""
    stamp, marker = directory / "stamp.json", directory / MARKER
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        return None
    start = time.perf_counter()
    if rank == 0 and title:
        print(title)
    interrupted = marker.exists() and marker.read_text() == key
    if rank == 0 and directory.exists() and not interrupted:
        if not marker.exists() and not stamp.exists() and any(directory.iterdir()):
            raise FileExistsError(f"{directory} holds files the toy pipeline did not make (no {MARKER}); move them "
                                  "or point NANOALIGN_TOY_DIR at another folder")
        shutil.rmtree(directory)  # a stale stage of ours: nothing of it may survive
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(key)
    barrier()
    info = build(directory) if every_rank or rank == 0 else None
    seconds = time.perf_counter() - start
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"key": key, "version": VERSION, "seconds": round(seconds, 1), **(info or {})}))
    barrier()
    return seconds


# ----------------------------------------------------------------------------------------------------- stages
def build_corpus(directory: Path, recipe: Recipe) -> dict:
    reviews = make_corpus(recipe.n_pretrain + recipe.n_sft + recipe.n_eval, recipe.seed)
    pretrain, sft = reviews[:recipe.n_pretrain], reviews[recipe.n_pretrain:recipe.n_pretrain + recipe.n_sft]
    held_out = reviews[recipe.n_pretrain + recipe.n_sft:]
    rng = random.Random(recipe.seed + 1)
    write_jsonl(directory / "pretrain.jsonl", [{"text": text} for text in pretrain])
    write_jsonl(directory / "sft.jsonl", [dict(zip(("prompt", "completion"), split_prompt(t, rng))) for t in sft])
    write_jsonl(directory / "eval_prompts.jsonl", [{"prompt": split_prompt(t, rng)[0]} for t in held_out])
    return {}


def stage_config(cfg, recipe: Recipe, **values):
    """The run config of a model-training stage; device, dtype and compile follow the user's run."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    micro = min(recipe.micro_batch_size, values["batch_size"] // world_size)  # the batch must split over the ranks
    # bf16 autocast does not pay at this size on a CPU (a base-model step took twice as long in bf16 as in fp32)
    device = resolve_device(cfg.device)
    dtype = "float32" if cfg.dtype == "auto" and device == "cpu" else cfg.dtype
    system = {"device": device, "dtype": dtype, "compile": cfg.compile}
    resume = (Path(values["out_dir"]) / "ckpt.pt").exists()  # an interrupted stage goes on from its checkpoint
    args = {"algo": "sft", "seed": recipe.seed, "micro_batch_size": micro, "warmup_steps": 20, "log_interval": 50,
            "ckpt_interval": 100, "resume": resume, "overwrite": not resume, **system, **values}
    return load_config([f"--{k}={v}" for k, v in args.items()], algo_config)


def train_base(directory: Path, cfg, recipe: Recipe) -> dict:
    stage = stage_config(cfg, recipe, data=toy_dir() / DATA_FILES["text"], out_dir=directory, init_from="scratch",
                         tokenizer="toy", n_layer=recipe.n_layer, n_head=recipe.n_head, n_embd=recipe.n_embd,
                         block_size=recipe.block_size, max_len=recipe.block_size, max_steps=recipe.base_steps,
                         batch_size=recipe.base_batch, lr=recipe.base_lr)
    train(stage, SFT)
    return {}


def train_sft(directory: Path, cfg, recipe: Recipe) -> dict:
    stage = stage_config(cfg, recipe, data=toy_dir() / DATA_FILES["sft"], out_dir=directory,
                         init_from=f"ckpt:{toy_dir() / 'base'}", max_len=recipe.block_size,
                         max_steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr)
    train(stage, SFT)
    return {}


def train_reward_model(directory: Path, cfg, device, recipe: Recipe) -> dict:
    """(Added with PPO.) The proxy reward model: --algo=rm from the SFT model on directory/prefs.jsonl, which is
    annotations/prefs.jsonl followed by the pairs of SFT prompts [n_annotate:rm_prompts], labelled alike."""
    data, info = directory / "prefs.jsonl", {}
    if not dist.is_initialized() or dist.get_rank() == 0:
        sft_rows = read_jsonl(toy_dir() / DATA_FILES["sft"], "sft")
        extra = [row["prompt"] for row in sft_rows[recipe.n_annotate:recipe.rm_prompts]]
        prefs, _, stats = label_prompts(extra, device, recipe, seed=recipe.seed + 1) if extra else ([], [], {})
        base = read_jsonl(toy_dir() / DATA_FILES["preference"], "preference")
        write_jsonl(data, base + prefs)
        info = {"pairs": len(base) + len(prefs), "extra_pairs": len(prefs),
                "extra_identical_pairs": stats.get("identical_pairs", 0)}
    barrier()
    stage = stage_config(cfg, recipe, algo="rm", data=data, out_dir=directory, init_from=f"ckpt:{toy_dir() / 'sft'}",
                         max_len=recipe.block_size, max_steps=recipe.rm_steps, batch_size=recipe.rm_batch,
                         lr=recipe.rm_lr, rm_readout=recipe.rm_readout)
    train(stage, get_algorithm("rm"))
    return info


def sample_sft(prompts: list[str], k: int, device, recipe: Recipe, seed: int) -> list[str]:
    """k completions per prompt from the SFT model at temperature 1, as texts; prompt i's are [i * k:(i + 1) * k]."""
    model, tokenizer = model_from_checkpoint(load_checkpoint(toy_dir() / "sft", device), device)
    model.eval()
    prompt_ids = [tokenizer.encode(p) for p in prompts for _ in range(k)]
    sampler = model_sampler(model, tokenizer, recipe.max_new_tokens)
    return [completion_text(tokenizer, c) for c in sample_completions(sampler, prompt_ids, seed, 256, device)]


def label_prompts(prompts: list[str], device, recipe: Recipe, seed: int):
    """Sample completions_per_prompt completions per prompt from the SFT model, score them with the gold reward and
    label them like the annotators: (preference rows, binary rows, stats)."""
    k = recipe.completions_per_prompt
    samples = sample_sft(prompts, k, device, recipe, seed)
    rng, stats = random.Random(seed), {}
    prefs, binary, rewards_all, grammatical = [], [], [], []
    for i, prompt in enumerate(prompts):
        completions = [c for c in samples[i * k:(i + 1) * k] if c.strip()]  # an empty completion is no answer
        rewards = [gold_reward(prompt + c) for c in completions]
        rewards_all += rewards
        grammatical += [is_grammatical(prompt + c) for c in completions]
        prefs += label_pairs(prompt, completions, rewards, rng=rng, tau=recipe.tau,
                             pairs_per_prompt=recipe.pairs_per_prompt, stats=stats)
        binary += binary_feedback(prompt, completions, rewards, rng=rng, tau=recipe.tau)
    n = max(len(rewards_all), 1)
    return prefs, binary, {"identical_pairs": stats.get("identical_pairs", 0),
                           "empty_completions": len(samples) - len(rewards_all),
                           "sft_gold_reward": round(sum(rewards_all) / n, 4),
                           "sft_grammatical": round(sum(grammatical) / n, 4)}


def annotate(directory: Path, device, recipe: Recipe) -> dict:
    """The annotators' data for the first n_annotate SFT prompts: prefs.jsonl, binary.jsonl, prompts.jsonl."""
    prompts = [row["prompt"] for row in read_jsonl(toy_dir() / DATA_FILES["sft"], "sft")[:recipe.n_annotate]]
    prefs, binary, stats = label_prompts(prompts, device, recipe, seed=recipe.seed)
    write_jsonl(directory / "prefs.jsonl", prefs)
    write_jsonl(directory / "binary.jsonl", binary)
    write_jsonl(directory / "prompts.jsonl", [{"prompt": p} for p in prompts])
    return {"pairs": len(prefs), "binary": len(binary), **stats}


def build_lists(directory: Path, device, recipe: Recipe) -> dict:
    """(Added with PRO, RRHF, LiPO.) lists.jsonl: listwise_k completions for each annotation prompt, sampled with the
    annotations' seed (so with listwise_k = completions_per_prompt they are the annotations' samples), empty ones
    dropped as there, scored by world.score_list's noisy annotator."""
    prompts = [row["prompt"] for row in read_jsonl(toy_dir() / DATA_FILES["sft"], "sft")[:recipe.n_annotate]]
    k = recipe.listwise_k
    samples = sample_sft(prompts, k, device, recipe, seed=recipe.seed)
    rng, stats, rows, empty = random.Random(recipe.seed + 3), {}, [], 0
    for i, prompt in enumerate(prompts):
        completions = [c for c in samples[i * k:(i + 1) * k] if c.strip()]  # an empty completion is no answer
        empty += k - len(completions)
        row = score_list(prompt, completions, [gold_reward(prompt + c) for c in completions], rng=rng,
                         tau=recipe.tau, stats=stats)
        rows += [row] if row else []
    write_jsonl(directory / "lists.jsonl", rows)
    sizes = [len(row["completions"]) for row in rows]
    return {"lists": len(rows), "completions": sum(sizes), "empty_completions": empty,
            "duplicate_completions": stats.get("duplicates", 0), "short_lists": stats.get("short_lists", 0)}


# ----------------------------------------------------------------------------------------------- entry points
PROXY_RM_ALGOS = ("ppo",)  # scored by the learned proxy reward model (InstructGPT's setting); other online runs by gold


def prepare(cfg, algorithm_cls, recipe: Recipe | None = None):
    """Build whatever is missing of the toy world. Returns (the run config with the toy world's inputs filled in,
    {stage: seconds, or None when it came from the cache}); `cfg` itself is left as it was. Filled in: data (by
    algorithm_cls.data_format), init_from unless set (the SFT model, or the base model for starts_from = "base"),
    an online run's empty reward_model ("gold", or the proxy RM for PROXY_RM_ALGOS) and monitor_reward ("gold"),
    and dtype "auto" -> float32 on a CPU."""
    recipe = recipe or default_recipe()
    root = toy_dir()
    rank, _, device = setup_distributed(cfg)  # initialises the process group before the first barrier
    keys, timings, key = {}, {}, ""
    stages = (("corpus", False, lambda d: build_corpus(d, recipe), "writing the corpus"),
              ("base", True, lambda d: train_base(d, cfg, recipe), "pretraining the base model, ~2 min on 2 cores"),
              ("sft", True, lambda d: train_sft(d, cfg, recipe), "supervised fine-tuning, ~1 min"),
              ("annotations", False, lambda d: annotate(d, device, recipe),
               "sampling the SFT model and labelling pairs with the simulated annotators, ~30 s"))
    with build_lock(root, rank):
        for i, (stage, every_rank, build, what) in enumerate(stages, 1):
            keys[stage] = key = stage_key(stage, recipe, upstream=key)  # a changed stage changes all keys after it
            title = f"toy world {i}/{len(stages)} ({root / stage}): {what}"
            timings[stage] = run_stage(root / stage, key, build, rank, every_rank, title)
        fills = {}
        if getattr(cfg, "reward_model", None) == "" and cfg.algo in PROXY_RM_ALGOS:  # the proxy RM, built once
            keys["rm"] = stage_key("rm", recipe, keys["annotations"])
            timings["rm"] = run_stage(root / "rm", keys["rm"], lambda d: train_reward_model(d, cfg, device, recipe),
                                      rank, True, f"toy world, PPO's proxy reward model ({root / 'rm'}): labelling "
                                      "more pairs and training it, ~8 min on 2 cores")
            fills["reward_model"] = f"ckpt:{root / 'rm'}"
        elif getattr(cfg, "reward_model", None) == "":  # any other online run optimises the gold reward itself
            fills["reward_model"] = "gold"
        if algorithm_cls.data_format == "listwise":  # the ranked lists, built once
            keys["listwise"] = stage_key("listwise", recipe, keys["annotations"])
            timings["listwise"] = run_stage(root / "listwise", keys["listwise"],
                                            lambda d: build_lists(d, device, recipe), rank, False, f"toy world, the listwise data ({root / 'listwise'}): "
                                            "sampling the SFT model and scoring lists, ~30 s")
    if getattr(cfg, "monitor_reward", None) == "":
        fills["monitor_reward"] = "gold"  # logged beside a proxy reward: over-optimisation of the proxy shows
    if rank == 0:
        print(f"toy world in {root}: " + ", ".join(
            f"{stage} {'cached' if s is None else f'built in {s:.1f} s'}" for stage, s in timings.items()))
    fmt = algorithm_cls.data_format
    if fmt not in DATA_FILES:
        raise ValueError(f"{algorithm_cls.__name__}.data_format={fmt!r}: the toy world has {', '.join(DATA_FILES)}")
    fills["data"] = str(root / DATA_FILES[fmt])
    if getattr(cfg, "ptx_coef", 0) and not cfg.ptx_data:  # PPO-ptx: the base model's pretraining corpus
        fills["ptx_data"] = str(root / DATA_FILES["text"])
    if not cfg.init_from:
        fills["init_from"] = f"ckpt:{root / algorithm_cls.starts_from}"
    if cfg.dtype == "auto" and not torch.cuda.is_available():
        fills["dtype"] = "float32"  # the toy model is too small for bf16 to pay on a CPU (see stage_config)
    return dataclasses.replace(cfg, **fills), timings


def toy_run(cfg):
    """What `python train.py` does without --data: build what is missing of the toy world, train the algorithm on
    it (out_dir defaults to out/<algo>) and evaluate the result against the SFT model. Returns the out dir."""
    algorithm = get_algorithm(cfg.algo)
    cfg, _ = prepare(cfg, algorithm)
    out_dir = train(dataclasses.replace(cfg, out_dir=cfg.out_dir or f"out/{cfg.algo}"), algorithm)
    evaluate_run(cfg, out_dir)
    return out_dir


def evaluate_run(cfg, out_dir, recipe: Recipe | None = None, seed: int = 0, n_samples: int = 1) -> dict | None:
    """Rank 0: evaluate the run's policy against the SFT model on the held-out prompts, n_samples each; write
    eval.json (eval_n<n_samples>_seed<seed>.json for other than the standard 1 sample at seed 0)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    recipe = recipe or default_recipe()
    out_dir, device = Path(out_dir), torch.device(resolve_device(cfg.device))
    ckpt = load_checkpoint(out_dir, device)
    if ckpt.get("kind", "policy") != "policy":
        print(f"eval: {out_dir} holds a {ckpt['kind']} model, not a policy; no samples to score")
        return None
    policy, tokenizer = model_from_checkpoint(ckpt, device)
    reference, _ = model_from_checkpoint(load_checkpoint(toy_dir() / "sft", device), device)
    prompts = [row["prompt"] for row in read_jsonl(toy_dir() / "corpus" / "eval_prompts.jsonl", "prompt")]
    format_prompt = get_algorithm(cfg.algo).format_prompt  # CoH samples after its feedback phrase
    policy_prompts = [format_prompt(cfg, p) for p in prompts]
    start = time.perf_counter()
    result = evaluate(policy, reference, tokenizer, prompts, n_samples=n_samples, seed=seed,
                      max_new_tokens=recipe.max_new_tokens, policy_prompts=policy_prompts)
    result.update(algo=cfg.algo, out_dir=str(out_dir), seconds=round(time.perf_counter() - start, 1))
    path = out_dir / ("eval.json" if (n_samples, seed) == (1, 0) else f"eval_n{n_samples}_seed{seed}.json")
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result, f"eval: {len(prompts)} held-out prompts, {n_samples} sample(s) each at temperature 1; "
                               f"reference = the SFT model; {path}"))
    return result


def main(argv=None):
    """python -m nanoalign.toy.pipeline <run_dir> [...] [--n_samples=K --seed=S]: evaluate finished runs on the toy
    world (writes each run's eval.json, or eval_n<K>_seed<S>.json). train.py evaluates its own toy-world runs; this
    is for runs trained with an explicit --data, e.g. DPO on the reward model's comparisons
    (--data=out/toy/rm/prefs.jsonl --init_from=ckpt:out/toy/sft), and for tighter estimates with more samples."""
    parser = argparse.ArgumentParser(description="evaluate finished runs on the toy world's held-out prompts")
    parser.add_argument("runs", nargs="+", help="run folders (their ckpt.pt)")
    parser.add_argument("--n_samples", type=int, default=1, help="samples per held-out prompt (256 prompts)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (train.py's own evaluation uses 0)")
    args = parser.parse_args(argv)
    for run in args.runs:
        saved = load_checkpoint(run)["config"]  # the run's algo (CoH samples after its phrase) and device
        evaluate_run(SimpleNamespace(**saved), run, seed=args.seed, n_samples=args.n_samples)


if __name__ == "__main__":
    main()
