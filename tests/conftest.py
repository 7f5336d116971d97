"""Every test may use the toy world's tokenizer ("toy") and gold reward ("gold"): importing nanoalign.toy registers
them with the core, as train.py and sample.py do."""
import nanoalign.toy  # noqa: F401
