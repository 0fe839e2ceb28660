"""The package code a pipeline job runs: the import closure of its entry modules, computed.

A job's results depend on the emae source it executes, so both DAGs track it: `dvc.yaml` lists
the closure's files as `deps` of the stage, and each Snakemake rule has its digest among its
`params` (Snakemake reruns a job whose params changed). The closure is computed from the source
(`import` / `from ... import` statements found with `ast`, those inside functions included), so
it follows the code as it changes; nothing is listed by hand.

The walk is conservative: a function-level import counts even when that function is not called
in this job, and a module counts as soon as it is imported. Imports outside the emae package are
not followed (installed libraries are the environment, not this project's code).
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache, cached_property
from pathlib import Path

PACKAGE = "emae"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


class ImportGraph:
    """The modules of the package under `package_dir` and the package modules each one imports."""

    def __init__(self, package_dir: Path = PACKAGE_DIR) -> None:
        self.package_dir = Path(package_dir)
        self.root = self.package_dir.parent  # paths are given relative to it (the repository root)
        self._imports: dict[str, set[str]] = {}  # each file is parsed once (Snakemake asks per job)
        self._closures: dict[tuple[str, ...], list[str]] = {}

    @cached_property
    def files(self) -> dict[str, Path]:
        """module name -> source file (`emae.data` -> emae/data/__init__.py)."""
        files = {}
        for path in sorted(self.package_dir.rglob("*.py")):
            parts = path.relative_to(self.root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join(parts)] = path
        return files

    def imports(self, module: str) -> set[str]:
        """The package modules `module` imports (anywhere in its source), with their parent
        packages: importing emae.train.pretrain runs emae/__init__.py and emae/train/__init__.py."""
        if module not in self._imports:
            self._imports[module] = self._parse_imports(module)
        return self._imports[module]

    def _parse_imports(self, module: str) -> set[str]:
        path = self.files[module]
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_bytes(), filename=str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node.module, node.level, package)
                found.add(base)
                # `from emae.data import prepare` imports the submodule emae.data.prepare
                found.update(f"{base}.{alias.name}" for alias in node.names)
        return {parent for name in found for parent in _with_parents(name) if parent in self.files}

    def closure(self, entries: Iterable[str]) -> list[str]:
        """Source files (relative to the repository root, sorted) of `entries` and every package
        module they import, transitively."""
        key = tuple(sorted(set(entries)))
        if key not in self._closures:
            self._closures[key] = self._walk(key)
        return self._closures[key]

    def _walk(self, entries: tuple[str, ...]) -> list[str]:
        todo = [parent for entry in entries for parent in _with_parents(entry)]
        unknown = [m for m in [*entries, *todo] if m not in self.files]
        if unknown:
            raise ValueError(f"not modules of {self.package_dir}: {', '.join(unknown)}")
        seen: set[str] = set()
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(self.imports(module) - seen)
        return sorted(self.files[m].relative_to(self.root).as_posix() for m in seen)

    def digest(self, paths: Iterable[str]) -> str:
        """A short content hash of the files (names included): it changes when any of them does."""
        sha = hashlib.sha256()
        for path in sorted(paths):
            sha.update(path.encode() + b"\0" + (self.root / path).read_bytes() + b"\0")
        return sha.hexdigest()[:16]


def _absolute(module: str | None, level: int, package: str) -> str:
    """The absolute name of `from <level dots><module> import ...` in `package`."""
    if level == 0:
        return module or ""
    base = package.split(".")
    base = base[:len(base) - level + 1]
    return ".".join([*base, *([module] if module else [])])


def _with_parents(name: str) -> list[str]:
    """emae.a.b -> [emae, emae.a, emae.a.b]; names outside the package -> []."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@cache
def command_modules(cli: Path = PACKAGE_DIR / "cli.py") -> dict[str, str]:
    """emae.cli's COMMANDS table (command -> module), read from its source as imports are: the
    closure reads code, it does not run it (and emae.cli is the layer above)."""
    tree = ast.parse(cli.read_bytes())
    table = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", "") == "COMMANDS")
    return {name: module for name, (module, _) in ast.literal_eval(table).items()}


def entry_modules(command: str, sections: Iterable[str] = ()) -> list[str]:
    """Where a pipeline job's code starts: `python -m emae.cli stage ...` (the command both DAGs
    run), `emae launch`, what the launcher runs the command line with (`python -m emae`), the job's
    own `emae COMMAND` module, and the modules that validate the params sections it reads."""
    from emae.config import SECTION_MODELS
    from emae.launch.job import DEFAULT_ENTRY

    commands = command_modules()
    if command not in commands:
        raise ValueError(f"unknown emae command {command!r}; commands: {', '.join(commands)}")
    validators = [SECTION_MODELS[s].split(":")[0] for s in sections if s in SECTION_MODELS]
    return [f"{PACKAGE}.cli", *(commands[c] for c in ("stage", "launch", command)), f"{DEFAULT_ENTRY}.__main__",
            *validators]
