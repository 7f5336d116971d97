"""Where a run's metrics go besides out_dir/metrics.jsonl (always written): `--report_to=` as in TRL.

    none         metrics.jsonl only (the default)
    tensorboard  out_dir/tensorboard/ event files (`pip install -e ".[tensorboard]"`; `tensorboard --logdir out`)
    wandb        a Weights & Biases run in out_dir/wandb (`pip install -e ".[wandb]"`); offline unless the
                 WANDB_MODE environment variable says otherwise, since these machines may have no network
Several may be given, comma-separated. Each logger gets the same rows as metrics.jsonl, on rank 0 only.
"""
import os

REPORTERS = ("none", "tensorboard", "wandb")


def parse(report_to):
    names = [n.strip() for n in report_to.split(",") if n.strip() and n.strip() != "none"]
    unknown = [n for n in names if n not in REPORTERS]
    if unknown:
        raise ValueError(f"report_to={report_to!r}: unknown {unknown}; choose from {', '.join(REPORTERS)}")
    return names


class Reporters:
    """log(record) sends a metrics row (its "step" and numeric values) to every chosen logger; close() flushes."""

    def __init__(self, report_to, out_dir, config, name):
        self.loggers = []
        for kind in parse(report_to):
            try:
                if kind == "tensorboard":
                    from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
                    self.loggers.append(("tensorboard", SummaryWriter(log_dir=str(out_dir / "tensorboard"))))
                else:
                    import wandb
                    os.environ.setdefault("WANDB_MODE", "offline")
                    run = wandb.init(project="nanoalign", name=name, dir=str(out_dir), config=config, reinit=True)
                    self.loggers.append(("wandb", run))
            except ImportError as err:
                raise ImportError(f"--report_to={kind} needs its package: pip install -e \".[{kind}]\"") from err

    def log(self, record):
        step = record["step"]
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        for kind, logger in self.loggers:
            if kind == "tensorboard":
                for key, value in scalars.items():
                    logger.add_scalar(key, value, step)
            else:
                logger.log(scalars, step=step)

    def close(self):
        for kind, logger in self.loggers:
            logger.close() if kind == "tensorboard" else logger.finish()
        self.loggers = []
