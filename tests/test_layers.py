"""The import rules of docs/design.md ("Packages and the import rules"), checked on every import
of every module, those inside functions included: runtimes, training, calibration, lddm_export,
bottom to top, each importing only from below it (training only runtimes' contract modules)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtimes", "training", "calibration", "lddm_export")
# What training may take from runtimes: the contract both samplers share (schedules and the time
# grid, the noise protocol, steps and samples, the graph table, errors, the tokenizer entry) and the
# small pure utilities that make every tool behave alike (integer options, the one atomic write,
# progress).
TRAINING_FROM_RUNTIMES = ("runtimes.errors", "runtimes.schedules", "runtimes.noise", "runtimes.trajectory",
                          "runtimes.spec", "runtimes.tokenizer", "runtimes.options", "runtimes.fileio",
                          "runtimes.progress", "runtimes.prompts")
MAY_IMPORT = {
    "runtimes": ("runtimes",),
    "training": ("training",) + TRAINING_FROM_RUNTIMES,
    "calibration": ("calibration", "runtimes", "training"),
    "lddm_export": ("lddm_export", "calibration", "runtimes", "training"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_repository_module(name: str) -> bool:
    path = ROOT / name.replace(".", "/")
    return path.is_dir() or path.with_suffix(".py").is_file()


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `source`, at any depth (inside functions too).

    `from pkg import name` counts as importing pkg.name when that is a module of the repository.
    Relative imports are left out: they cannot leave their own package.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            found += [(node.lineno, f"{node.module}.{alias.name}" if is_repository_module(f"{node.module}.{alias.name}")
                       else node.module) for alias in node.names]
    return found


def violations(module: str, source: str) -> list[str]:
    """Why each import of `module` breaks the rules (empty when none does)."""
    layer = module.split(".")[0]
    allowed = MAY_IMPORT[layer]
    problems = []
    for line, target in imported_modules(source):
        if target.split(".")[0] not in PACKAGES:
            continue  # the standard library and third-party packages
        if not any(target == a or target.startswith(a + ".") for a in allowed):
            problems.append(f"{module} (line {line}) imports {target}; {layer} may import only "
                            f"{', '.join(allowed)} (docs/design.md, 'Packages and the import rules')")
    return problems


def package_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_package_has_modules_to_check():
    assert all(any(p.parts[len(ROOT.parts)] == package for p in package_modules()) for package in PACKAGES)


@pytest.mark.parametrize("path", package_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layers(path):
    problems = violations(module_name(path), path.read_text())
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports_inside_functions():
    planted = "import torch\n\ndef load():\n    from training.model import graph_modules\n    import lddm_export.build\n"
    assert violations("runtimes.backends.torch_runner", planted) == [
        "runtimes.backends.torch_runner (line 4) imports training.model; runtimes may import only runtimes "
        "(docs/design.md, 'Packages and the import rules')",
        "runtimes.backends.torch_runner (line 5) imports lddm_export.build; runtimes may import only runtimes "
        "(docs/design.md, 'Packages and the import rules')"]
    assert violations("training.sampling", "from runtimes import bundle\nfrom runtimes.noise import draw_noise\n") \
        == ["training.sampling (line 1) imports runtimes.bundle; training may import only training, "
            + ", ".join(TRAINING_FROM_RUNTIMES) + " (docs/design.md, 'Packages and the import rules')"]
    assert not violations("calibration.fp16_islands", "def f():\n    from training.model import LDDM\n")
