"""The layer rule, read from the import graph, and torch-free config loading.

Layers (docs/architecture.md): core <- train / eval / dense <- launch / sweep / workflow / report <- cli.
A module may import its own layer or lower ones only. Every import counts: module level and inside
functions (lazy imports are still dependencies), absolute and relative, plus registry strings of the
form "emae.pkg.module:Name" (SECTION_MODELS, entry points) since they are imported by name at run time.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "emae"

# Top-level part of a module name -> layer (higher may import lower, never the reverse).
LAYERS: dict[str, int] = {
    **dict.fromkeys(["__init__", "masking", "losses", "models", "data", "seeding", "io", "errors",
                     "config", "provenance", "patches", "flops", "attention"], 0),
    **dict.fromkeys(["train", "eval", "dense"], 1),
    **dict.fromkeys(["launch", "sweep", "workflow", "report"], 2),
    **dict.fromkeys(["cli", "__main__"], 3),  # `python -m emae` is the CLI
}

# Known upward references: (importer, imported). The test fails on any pair not listed here, and on a
# listed pair that no longer occurs (so the list only shrinks). Fixing one means moving code down a layer.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    # The section registry: core config names the modules that own later sections' schemas so
    # `validate_all` checks a whole params tree before submission (imported only on demand).
    **{("emae.config", module): "SECTION_MODELS registry" for module in [
        "emae.launch.config", "emae.workflow.config", "emae.dense.config", "emae.eval.config",
        "emae.sweep.config"]},
}

REGISTRY_STRING = re.compile(r"(emae(?:\.\w+)*):\w+")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (PACKAGE_DIR.parent / rel.with_suffix(".py")).is_file() or (
        PACKAGE_DIR.parent / rel / "__init__.py").is_file()


def imported_modules(source: str, importer: str, is_package: bool) -> set[str]:
    """Every emae module `source` imports or names as a "module:attr" registry string."""
    found: set[str] = set()
    package = importer if is_package else importer.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            found.add(target)
            # `from emae import config` imports the submodule emae.config
            found.update(f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = REGISTRY_STRING.fullmatch(node.value)
            if match:
                found.add(match.group(1))
    return {name for name in found if name == "emae" or name.startswith("emae.")}


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    if top not in LAYERS:
        raise KeyError(f"{module}: top-level part {top!r} has no layer; add it to LAYERS "
                       "(and to the layer paragraph of docs/architecture.md)")
    return LAYERS[top]


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        importer = module_name(path)
        graph[importer] = imported_modules(path.read_text(), importer, path.name == "__init__.py")
    return graph


def upward_imports() -> set[tuple[str, str]]:
    return {(importer, imported) for importer, targets in import_graph().items()
            for imported in targets if layer(imported) > layer(importer)}


def test_every_module_has_a_layer() -> None:
    for importer, targets in import_graph().items():
        for module in {importer, *targets}:
            layer(module)


def test_imports_point_downward_only() -> None:
    upward = upward_imports()
    print("allowed upward references (importer -> imported):")
    for pair in sorted(upward & ALLOWED_UPWARD.keys()):
        print(f"  {pair[0]} -> {pair[1]}  ({ALLOWED_UPWARD[pair]})")
    new = sorted(upward - ALLOWED_UPWARD.keys())
    assert not new, ("upward imports (a module may import its own layer or lower ones only, "
                     "see docs/architecture.md):\n" + "\n".join(f"  {a} -> {b}" for a, b in new))
    stale = sorted(ALLOWED_UPWARD.keys() - upward)
    assert not stale, "no longer imported; remove from ALLOWED_UPWARD:\n" + "\n".join(map(str, stale))


def test_the_scanner_sees_lazy_relative_and_registry_imports() -> None:
    source = textwrap.dedent("""
        import emae.io
        from emae import config
        from . import checkpoint
        from ..launch import runner
        ENTRY = "emae.cli:main"

        def later():
            from emae.sweep.study import run_study
    """)
    found = imported_modules(source, "emae.train.pretrain", is_package=False)
    assert found >= {"emae.io", "emae.config", "emae.train.checkpoint", "emae.launch.runner",
                     "emae.cli", "emae.sweep.study"}
    assert {m for m in found if layer(m) > layer("emae.train.pretrain")} == {
        "emae.launch", "emae.launch.runner", "emae.cli", "emae.sweep.study"}


HEAVY = ("torch", "timm", "torchvision")
# CPU seconds (the whole process, interpreter start included) that every pipeline job may spend on
# its params: `emae stage` builds a Pipeline, validating every section of every variant (issue 16:
# <= 1.5 s; ~0.4 s measured on 2 shared cores, ~4.7 s while the eval sections imported torch/timm).
PIPELINE_CPU_SECONDS = 1.5


def _in_fresh_python(code: str) -> list[str]:
    """Run `code` in a new interpreter at the repository root; its last line of output, split."""
    check = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            cwd=PACKAGE_DIR.parent, timeout=60, check=True)
    return result.stdout.splitlines()


@pytest.mark.parametrize("code", [
    "from emae.config import load_config; load_config(['params'])",
    "from emae.config import load_config, validate_all; validate_all(load_config(['params']))",
    "from emae.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
], ids=["load_config", "validate_all", "emae --help"])
def test_config_and_help_do_not_import_torch(code: str) -> None:
    lines = _in_fresh_python(code)
    assert lines[-1] == "[]", lines


def test_a_pipeline_job_loads_its_params_without_torch_in_little_cpu() -> None:
    code = ("import resource\nfrom emae.workflow.stages import Pipeline\nPipeline()\n"
            "usage = resource.getrusage(resource.RUSAGE_SELF)\nprint(usage.ru_utime + usage.ru_stime)")
    *_, cpu, heavy = _in_fresh_python(code)
    assert heavy == "[]", f"Pipeline() imported {heavy}"
    print(f"Pipeline(): {float(cpu):.2f} s CPU")
    assert float(cpu) <= PIPELINE_CPU_SECONDS, (
        f"Pipeline() took {float(cpu):.2f} s of CPU (> {PIPELINE_CPU_SECONDS}): every pipeline job pays it")
