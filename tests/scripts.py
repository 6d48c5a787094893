"""The repository's scripts outside any package (infra/, benchmarks/), loaded as modules in a test."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: str | Path) -> ModuleType:
    """The script at ``path`` (absolute, or relative to the repository root) run as a module named after its
    file; registered in ``sys.modules``, where its dataclasses look their module up (removed again if the
    script fails, as an import would)."""
    path = ROOT / path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module
