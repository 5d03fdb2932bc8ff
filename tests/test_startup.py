"""Every script parses its options and answers --help without importing torch, diffusers or transformers (they take
seconds to import; the options need none of them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "safetensors", "datasets", "cleanfid")

# Runs in a fresh interpreter: importing one of HEAVY raises, then the script answers --help as a user's shell runs it.
BLOCKED_HELP = f"""
import sys

class RefuseHeavyImports:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {HEAVY!r}:
            raise ImportError(f"{{name}} imported before the options were parsed")

sys.meta_path.insert(0, RefuseHeavyImports())
script, *arguments = sys.argv[1:]
sys.argv = [script + ".py", *arguments]
module = __import__(script)
from common.cli import run_app
run_app(module.app)
"""

COMMANDS = [
    ["infer", "--help"],
    ["train_lora", "--help"],
    ["gen_class_images", "--help"],
    ["merge_lora", "--help"],
    ["mjhq_fid", "--help"],
    ["mjhq_fid", "generate", "--help"],
    ["mjhq_fid", "score", "--help"],
    ["mjhq_fid", "report", "--help"],
    ["mjhq_fid", "all", "--help"],
    ["convert_for_webui", "--help"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_needs_no_torch_diffusers_or_transformers(command):
    result = subprocess.run([sys.executable, "-c", BLOCKED_HELP, *command], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Usage:" in result.stdout and "--help" in result.stdout, result.stdout[:500]


def test_the_blocker_does_refuse_torch():
    """The guard itself: a script that imports torch at module level fails under it."""
    result = subprocess.run([sys.executable, "-c", BLOCKED_HELP.replace("module = __import__(script)", "import torch"), "infer", "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "torch imported before the options were parsed" in result.stderr


def test_setup_refuses_a_venv_with_another_torch_pair_in_one_line(tmp_path):
    """scripts/setup.sh against a requirements.txt pinning another pair than the venv holds (the venv's own python
    behind a wrapper, so that nothing is installed or changed)."""
    import hashlib
    import shutil

    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    requirements = (REPO / "requirements.txt").read_text()
    other = requirements.replace("\ntorch==", "\ntorch==2.9.1  # was ").replace("\ntorchvision==", "\ntorchvision==0.24.1  # was ")
    (tmp_path / "requirements.txt").write_text(other)
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(f'#!/bin/sh\nexec "{REPO / ".venv" / "bin" / "python"}" "$@"\n')
    (venv_bin / "python").chmod(0o755)
    (tmp_path / ".venv" / ".requirements.sha256").write_text(hashlib.sha256(other.encode()).hexdigest() + "\n")
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    import torch
    import torchvision

    installed = f"{torch.__version__.split('+')[0]} {torchvision.__version__.split('+')[0]}"
    assert f"has torch and torchvision {installed}, but this toolkit is tested with 2.9.1 and 0.24.1" in result.stderr


def test_requirements_pin_every_package_and_the_venv_holds_them():
    from importlib.metadata import version

    pins = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    pins = [pin for pin in pins if pin]
    assert pins and all("==" in pin for pin in pins), [pin for pin in pins if "==" not in pin]
    installed = {name: version(name).split("+")[0] for name, _ in (pin.split("==") for pin in pins)}
    assert all(installed[name] == wanted for name, wanted in (pin.split("==") for pin in pins)), installed
