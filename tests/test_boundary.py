"""The boundary between the control plane and the torch side, checked rather than kept by habit.

The control plane is every module of orchestrator/ (found by walking the folder, so a new module is covered without
touching this file). Imported alone in a fresh interpreter, none of them may load:
- torch or triton;
- a torch-side module: any module of worker/ or kernels/, and any module of model/ or tasks/ that imports torch (or
  triton, or a worker/kernels module) at module level.

The control plane does use pure-data modules of model/ and tasks/ (candidate library, FS options, model presets,
checkpoint metadata, tokenizers, the task registry that spec validation loads). Those are named in ALLOWED below;
each of them is checked to be torch-free itself (no module-level torch import, and importing it alone loads no
torch), and any other model/ or tasks/ module that a control-plane import loads is a failure.

Torch-side modules import torch at their top: a function-local `import torch` there saves nothing and hides the
module's nature, so it is a failure too (lazy imports of torch's optional submodules, such as torch._dynamo, and of
optional packages, such as triton or fla, stay allowed).
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONTROL_PLANE = "orchestrator"
TORCH = ("torch", "triton")
TORCH_SIDE_PACKAGES = ("worker", "kernels")  # every module of these is torch-side
MIXED_PACKAGES = ("model", "tasks")  # torch-side where a module imports torch at module level

# model/ modules the control plane may load: data and file formats, no tensors
ALLOWED_MODEL = frozenset({"model", "model.candidates", "model.ckpt_meta", "model.config", "model.fs_config",
                           "model.tokenizers"})


def modules_of(package: str) -> list[str]:
    """Every module of a top-level package, from its files (nothing is imported to find them)."""
    root = REPO / package
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_path(name: str) -> Path:
    base = REPO.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _is_torch_side_name(name: str) -> bool:
    return name.split(".")[0] in TORCH + TORCH_SIDE_PACKAGES


def module_level_imports(name: str) -> list[str]:
    """Names a module imports when it is imported: its import statements outside function bodies."""
    tree = ast.parse(module_path(name).read_text(encoding="utf-8"))
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append(child.module)
            visit(child)

    visit(tree)
    return found


def function_local_imports(name: str) -> list[str]:
    """Names a module imports inside function bodies."""
    tree = ast.parse(module_path(name).read_text(encoding="utf-8"))
    found: list[str] = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    found.extend(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    found.append(node.module)
    return found


def torch_side_modules() -> set[str]:
    """worker/ and kernels/ whole, and the model/ and tasks/ modules that import torch at module level."""
    side = {m for p in TORCH_SIDE_PACKAGES for m in modules_of(p)}
    for package in MIXED_PACKAGES:
        side |= {m for m in modules_of(package) if any(_is_torch_side_name(i) for i in module_level_imports(m))}
    return side


ALLOWED = ALLOWED_MODEL | frozenset(modules_of("tasks"))  # tasks: the registry loads every task for validation


def boundary_violations(loaded: set[str]) -> list[str]:
    """What a control-plane import must not have loaded, each with the rule it breaks."""
    side = torch_side_modules()
    out = []
    for m in sorted(loaded):
        top = m.split(".")[0]
        if m in TORCH:
            out.append(f"{m} (torch itself)")
        elif top in TORCH_SIDE_PACKAGES:
            out.append(f"{m} (every module of {top}/ is torch-side)")
        elif top in MIXED_PACKAGES and m in side:
            out.append(f"{m} (imports torch at module level)")
        elif top in MIXED_PACKAGES and m not in ALLOWED:
            out.append(f"{m} (not on the control plane's allowlist of model/ and tasks/ modules)")
    return out


def loaded_after(code: str) -> set[str]:
    """sys.modules of a fresh interpreter (repository root as working directory) after running `code`."""
    script = f"{code}\nimport json, sys\nprint('MODULES', json.dumps(sorted(sys.modules)))"
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("MODULES "))
    return set(json.loads(line.removeprefix("MODULES ")))


@pytest.mark.parametrize("module", modules_of(CONTROL_PLANE))
def test_control_plane_module_loads_no_torch_side_module(module):
    assert boundary_violations(loaded_after(f"import {module}")) == []


def test_read_side_commands_load_no_torch_side_module():
    """What a control-plane import leaves lazy must stay torch-free too when it runs: spec validation (which loads
    every task, the tokenizer and the model presets) and the catalog."""
    code = ("from orchestrator.cli import main\n"
            "assert main(['validate', '--spec', 'studies/demo.yaml']) == 0\n"
            "assert main(['list', 'tasks']) == 0\n"
            "assert main(['list', 'presets']) == 0\n")
    assert boundary_violations(loaded_after(code)) == []


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_allowlisted_module_is_torch_free(module):
    assert not [i for i in module_level_imports(module) if _is_torch_side_name(i)]
    assert not [m for m in loaded_after(f"import {module}") if m.split(".")[0] in TORCH + TORCH_SIDE_PACKAGES]


def test_the_check_sees_the_torch_side():
    """The rule is not vacuous: the model's torch modules count as torch-side, and importing one is reported."""
    side = torch_side_modules()
    assert {"model.rwkv7", "model.future_seed", "model.checkpoint", "worker.run", "kernels.dispatch"} <= side
    assert not side & ALLOWED
    found = boundary_violations(loaded_after("import model.future_seed"))
    assert "torch (torch itself)" in found and "model.future_seed (imports torch at module level)" in found


@pytest.mark.parametrize("module", sorted(torch_side_modules()))
def test_torch_side_module_imports_torch_at_its_top(module):
    assert "torch" not in function_local_imports(module)
