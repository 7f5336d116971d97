"""Typed training configuration: defaults < preset file < overrides dict < --key=value.

nanoGPT's semantics (typed defaults, a preset file, `--key=value`, an unknown key is an error) as an
importable function instead of `exec` of globals, so train.py stays testable:

    cfg = load_config(["data/coh_toy.toml", "--lr=5e-5", "--compile"], algo_configs=nanoalign.algos.algo_config)
    cfg.lr, cfg.beta          # TrainConfig keys and the algorithm's own keys on one flat object

The preset is a flat TOML table (`lr = 5e-5`). The resolved config is saved in every checkpoint with
config_to_dict and rebuilt on resume with config_from_dict.
"""
import dataclasses
import difflib
import functools
import inspect
import tomllib
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

AlgoConfigs = Callable[[str], type | None]  # algorithm name -> its hyperparameter dataclass (or None)


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Range:
    """A key's valid values, declared next to its default (`lr: Annotated[float, POSITIVE] = 1e-4`) and checked by
    load_config for every key, the algorithm's included, before a run writes anything."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False

    def __contains__(self, v):
        return not ((self.low is not None and (v < self.low or self.low_open and v == self.low)) or
                    (self.high is not None and (v > self.high or self.high_open and v == self.high)))

    def __str__(self):
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1, NON_NEGATIVE, POSITIVE = Range(1), Range(0), Range(0, low_open=True)
FRACTION, PROBABILITY = Range(0, 1), Range(0, 1, high_open=True)  # [0, 1] and [0, 1)


@dataclass
class TrainConfig:
    algo: str = "dpo"  # registry name of the algorithm (nanoalign/algos/)
    out_dir: str = ""  # "" -> out/<algo>
    data: str = ""  # training JSONL; "" -> the toy world's data for this algorithm
    eval_data: str = ""  # optional JSONL for periodic evaluation
    init_from: str = ""  # "" -> toy world's SFT model; "scratch"; "ckpt:<dir>"; "hf:<dir>"
    tokenizer: str = "toy"  # used with init_from=scratch: "toy" | "bytes" | "gpt2" | "hf:<dir>"
    # model shape, used only with init_from=scratch
    n_layer: Annotated[int, AT_LEAST_1] = 4  # transformer blocks
    n_head: Annotated[int, AT_LEAST_1] = 4  # attention heads
    n_kv_head: Annotated[int, NON_NEGATIVE] = 0  # key/value heads for grouped-query attention; 0 -> n_head
    n_embd: Annotated[int, AT_LEAST_1] = 128  # residual width
    block_size: Annotated[int, AT_LEAST_1] = 128  # maximum context length of the model
    arch: Literal["gpt2", "llama"] = "gpt2"  # learned pos + LayerNorm + GELU, or RoPE + RMSNorm + SwiGLU
    dropout: Annotated[float, PROBABILITY] = 0.0  # dropout probability inside the model
    max_len: Annotated[int, Range(2)] = 128  # max tokens per example; the prompt is cut from the left to fit
    # optimisation
    max_steps: Annotated[int, AT_LEAST_1] = 200  # optimizer steps
    batch_size: Annotated[int, AT_LEAST_1] = 32  # examples per optimizer step, summed over all ranks
    micro_batch_size: Annotated[int, AT_LEAST_1] = 8  # examples per forward pass on one rank; accumulation fills the rest
    lr: Annotated[float, POSITIVE] = 1e-4  # peak learning rate
    min_lr_ratio: Annotated[float, FRACTION] = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: Annotated[int, NON_NEGATIVE] = 10  # linear warmup from 0 to lr
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0  # AdamW decoupled weight decay
    adam_beta1: Annotated[float, PROBABILITY] = 0.9  # AdamW beta1
    adam_beta2: Annotated[float, PROBABILITY] = 0.95  # AdamW beta2
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0  # clip the global grad norm to this; 0 -> off
    max_nonfinite_steps: Annotated[int, AT_LEAST_1] = 3  # stop after this many steps in a row with a non-finite loss or grad norm
    # system
    device: str = "auto"  # "auto" -> cuda if available else cpu; or "cpu", "cuda", "cuda:1", "mps"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # bfloat16: autocast on fp32 weights, no-grad models in
    #                                                       bf16 (precision.py); auto -> bf16 where measured faster
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1 more forward
    fused_logps: bool = True  # log-probs through the fused head (logps.batch_logps); False -> full logits (plain)
    bucket_by_length: bool = True  # sort each global batch by length before cutting micro-batches (less padding)
    seed: int = 1337  # seeds the model init, the data order and sampling
    log_interval: Annotated[int, AT_LEAST_1] = 10  # log metrics every this many steps
    report_to: str = "none"  # also log to: none | tensorboard | wandb (comma-separated; nanoalign/report.py)
    eval_interval: Annotated[int, NON_NEGATIVE] = 0  # evaluate every this many steps; 0 -> never
    eval_batches: Annotated[int, AT_LEAST_1] = 10  # micro-batches per evaluation
    ckpt_interval: Annotated[int, NON_NEGATIVE] = 100  # save a checkpoint every this many steps; 0 -> only at the end
    resume: bool = False  # continue from out_dir/ckpt.pt (same data order, same step); an error without one
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2)
    ddp_timeout_s: Annotated[int, AT_LEAST_1] = 600  # a collective waits this long for a stalled rank, then all stop
    overwrite: bool = False  # start again in an out_dir that already holds a run (else the run refuses it)
    # LoRA (Hu et al. 2021); lora_rank=0 trains all weights
    lora_rank: Annotated[int, NON_NEGATIVE] = 0  # rank r of the low-rank update; 0 -> no LoRA
    lora_alpha: Annotated[float, POSITIVE] = 16.0  # the update is scaled by alpha / r
    lora_dropout: Annotated[float, PROBABILITY] = 0.0  # dropout on the LoRA input
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated module names that get adapters


# Names users bring from nanoGPT and TRL that difflib cannot match to ours (e.g. learning_rate -> lr).
KNOWN_ALIASES = {
    "learning_rate": "lr", "max_iters": "max_steps", "num_train_epochs": "max_steps",
    "warmup_iters": "warmup_steps", "min_lr": "min_lr_ratio", "beta1": "adam_beta1", "beta2": "adam_beta2",
    "max_grad_norm": "grad_clip", "gradient_accumulation_steps": "batch_size",
    "per_device_train_batch_size": "micro_batch_size", "output_dir": "out_dir", "max_length": "max_len",
    "logging_steps": "log_interval", "eval_steps": "eval_interval", "eval_iters": "eval_batches",
    "save_steps": "ckpt_interval", "bf16": "dtype", "lora_r": "lora_rank", "lora_target_modules": "lora_targets",
}


def load_config(argv: list[str], algo_configs: AlgoConfigs | None = None, overrides: dict | None = None):
    """Resolve the config from argv (`--key=value`, bare `--flag` = True, at most one `.toml` preset path)."""
    preset_path, argv_values = _parse_argv(argv)
    layers = []  # (where the values came from, values), lowest precedence first
    if preset_path is not None:
        layers.append((f"preset file {preset_path}", _read_preset(preset_path)))
    if overrides:
        layers.append(("overrides", dict(overrides)))
    layers.append(("the command line", argv_values))
    return _build(layers, algo_configs)


def help_text(algo: str, algo_config: type | None) -> str:
    """Every key with its type, default and the comment beside it in the source, generated from the dataclasses
    (TrainConfig's groups, then the algorithm's own keys), so --help never drifts from the code."""
    lines = []
    for cls, title in ((TrainConfig, "training"), (algo_config, f"--algo={algo}")):
        if cls is None:
            continue
        hints, defaults = typing.get_type_hints(cls), {f.name: f.default for f in dataclasses.fields(cls)}
        own = {f.name for f in dataclasses.fields(cls)} - ({f.name for f in dataclasses.fields(TrainConfig)}
                                                           if cls is not TrainConfig else set())
        lines.append(f"\n{title} keys:")
        seen = set()
        for klass in reversed(cls.__mro__):  # base classes first, so inherited keys keep their comments
            try:
                source = inspect.getsource(klass).splitlines()[1:] if dataclasses.is_dataclass(klass) else []
            except OSError:  # a variant's class made by algos.algo_config: its defaults are shown, its base's comments
                source = []
            for raw in source:
                text = raw.strip()
                if text.startswith("#") and cls is TrainConfig:
                    lines.append(f" {text.lstrip('# ')}:")
                name = text.split(":")[0].strip()
                if name in own and name not in seen and ":" in text and not text.startswith(("#", '"')):
                    comment = text.partition("#")[2].strip() if "#" in text else ""
                    kind = hints[name]
                    kind = ("|".join(map(str, typing.get_args(kind))) if typing.get_origin(kind) is Literal
                            else getattr(kind, "__name__", str(kind).replace("typing.", "")))
                    lines.append(f"  {f'--{name}={defaults[name]!r}':<34} {kind:<8} {comment}")
                    seen.add(name)
    return "\n".join(lines)


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_from_dict(d: dict, algo_configs: AlgoConfigs | None = None):
    """Rebuild a config saved with config_to_dict (checkpoints, resume); same checks as load_config."""
    return _build([("saved config", dict(d))], algo_configs)


def _parse_argv(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    preset_path, values = None, {}
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            values[key.replace("-", "_")] = value if has_value else True  # bare --flag means True
        elif arg.endswith(".toml") and preset_path is None:
            preset_path = arg
        elif arg.endswith(".toml"):
            raise ConfigError(f"only one preset file is allowed, got {preset_path} and {arg}")
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value or a .toml preset file")
    return preset_path, values


def _read_preset(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"preset file {path} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset file {path}: {e}") from None
    for key, value in table.items():
        if isinstance(value, dict):
            raise ConfigError(f"preset file {path}: [{key}] is a table; presets are one flat table of keys")
    return table


def _build(layers: list[tuple[str, dict]], algo_configs: AlgoConfigs | None):
    """Merge TrainConfig with the algorithm's dataclass, then apply each layer of values with type checks."""
    algo = TrainConfig.algo
    for source, values in layers:  # the algorithm decides which keys exist, so resolve it first
        if "algo" in values:
            algo = _convert("algo", values["algo"], str, source)
    algo_cls = algo_configs(algo) if algo_configs is not None else None
    config_cls = _config_class(algo_cls)
    types_by_key = typing.get_type_hints(config_cls)
    resolved, sources = {}, {}
    for source, values in layers:
        for key, value in values.items():
            if key not in types_by_key:
                raise ConfigError(_unknown_key_message(key, source, list(types_by_key), algo))
            resolved[key], sources[key] = _convert(key, value, types_by_key[key], source), source
    cfg = config_cls(**resolved)
    for key, hint in typing.get_type_hints(config_cls, include_extras=True).items():
        for valid in getattr(hint, "__metadata__", ()):
            if isinstance(valid, Range) and getattr(cfg, key) not in valid:
                raise ConfigError(f"config key {key!r} from {sources.get(key, 'the defaults')}: {getattr(cfg, key)!r} "
                                  f"is not {valid}")
    return cfg


@functools.cache  # one class per algorithm, so configs built twice compare equal
def _config_class(algo_cls: type | None) -> type:
    """One flat dataclass `Config` with TrainConfig's fields followed by the algorithm's."""
    fields = []
    for cls in (TrainConfig, algo_cls) if algo_cls is not None else (TrainConfig,):
        hints = typing.get_type_hints(cls, include_extras=True)  # keeps each key's Range
        for f in dataclasses.fields(cls):
            fields.append((f.name, hints[f.name], dataclasses.field(default=f.default, default_factory=f.default_factory)))
    names = [name for name, _, _ in fields]
    clashes = sorted({name for name in names if names.count(name) > 1})
    if clashes:
        raise ConfigError(f"{algo_cls.__name__} redefines TrainConfig keys {clashes}; rename them in the algorithm")
    return dataclasses.make_dataclass("Config", fields)


def _unknown_key_message(key: str, source: str, known: list[str], algo: str) -> str:
    suggestions = difflib.get_close_matches(key, known, n=3)
    if KNOWN_ALIASES.get(key) in known and KNOWN_ALIASES[key] not in suggestions:
        suggestions.insert(0, KNOWN_ALIASES[key])
    hint = f"; did you mean {' or '.join(suggestions)}?" if suggestions else ""
    return f"unknown config key {key!r} from {source} (algo={algo}){hint}"


def _convert(key: str, value: Any, expected: Any, source: str) -> Any:
    """Check `value` against the annotation `expected`, converting command-line strings."""
    def fail():
        if typing.get_origin(expected) is Literal:
            name = "one of " + ", ".join(map(repr, typing.get_args(expected)))
        else:
            name = getattr(expected, "__name__", None) or str(expected).replace("typing.", "")
        return ConfigError(f"config key {key!r} from {source}: expected {name}, got {value!r}")

    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(key, value, option, source)
            except ConfigError:
                pass
        raise fail()
    if origin is Literal:
        if value in args:
            return value
        raise fail()
    if expected is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no"):
            return False
        raise fail()
    if expected in (int, float):  # an int is a fine float, a bool is neither
        if isinstance(value, bool) or (expected is int and isinstance(value, float)):
            raise fail()
        if isinstance(value, (int, float)):
            return expected(value)
        if not isinstance(value, str):
            raise fail()
        try:
            return expected(value)  # "1e-4" for a float, "200" for an int
        except ValueError:
            raise fail() from None
    if expected is str:
        if isinstance(value, str):
            return value
        raise fail()
    if isinstance(expected, type) and isinstance(value, expected):  # lists, dicts from a preset or a saved config
        return value
    if origin is not None and isinstance(value, origin):  # list[int], dict[str, float], ...
        return value
    raise fail()
