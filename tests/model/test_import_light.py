"""`import model` (and its torch-free config modules) must not import torch; lazy exports resolve on access."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_model_package_is_import_light():
    code = ("import sys, model, model.config, model.fs_config, model.candidates\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n"
            "from model import RWKV7, FSGates, init_weights, load_any\n"
            "assert 'torch' in sys.modules and RWKV7.__module__ == 'model.rwkv7'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
