"""The package's layering, checked on its import statements (README "Development" has the map):
the library never imports the jobs or the verbs, the kernels are a leaf, a module never imports
another module's private names, and an import inside a function is for an optional dependency,
never for a lorakit module (a cycle dodged that way means a responsibility is in the wrong place)."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "lorakit"
JOBS = ("lorakit.train", "lorakit.serve", "lorakit.plan", "lorakit.verbs", "lorakit.cli")
ABOVE_THE_LIBRARY = JOBS + ("lorakit.__main__",)
# lorakit modules that may be imported inside a function: they import an optional dependency
# (triton for the kernels, fastapi for the app), so importing them at the top would make it required
OPTIONAL = ("lorakit.kernels.", "lorakit.serve.app")


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(imported lorakit module, names, at module level?) for each import of a lorakit module."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(n) for node in tree.body if isinstance(node, ast.If)
                                        for n in node.body}   # `if TYPE_CHECKING:` blocks count as top
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "lorakit" or target.startswith("lorakit."):
                yield target, [a.name for a in node.names], id(node) in top
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("lorakit"):
                    yield alias.name, [], id(node) in top


MODULES = sorted(SRC.rglob("*.py"))


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_package_has_the_layers_the_map_names():
    names = {_module_name(p) for p in MODULES}
    for required in ("lorakit.model_io", "lorakit.files", "lorakit.patching", "lorakit.verbs.merge",
                     "lorakit.compose.mixture_files", "lorakit.train.kernels", "lorakit.ops.dropout_bits"):
        assert required in names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p))
def test_imports_point_down(path):
    me = _module_name(path)
    for target, names, at_top in _imports(path):
        if not _is_under(me, ABOVE_THE_LIBRARY):
            assert not _is_under(target, JOBS), f"library module {me} imports {target} (a job or verb)"
        if me.startswith("lorakit.kernels"):
            assert target.startswith("lorakit.kernels"), f"{me} imports {target}: kernels/ is a leaf"
        for n in names:
            assert not (n.startswith("_") and not n.startswith("__")), f"{me} imports private {n} from {target}"
        if not at_top and me != "lorakit.cli":   # the CLI defers its imports so --help stays fast
            assert target.startswith(OPTIONAL), (
                f"{me} imports {target} inside a function; import lorakit modules at the top "
                "(only modules that need an optional dependency may be deferred)")


LAZY_PACKAGES = ["lorakit", "lorakit.builtin", "lorakit.compose", "lorakit.plan", "lorakit.serve"]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_a_lazy_package_exports_what_it_names(package):
    """Each name a package exports resolves to the object its module defines, is cached on the
    package, and is listed by dir(); a submodule resolves as it would from an eager package."""
    mod = importlib.import_module(package)
    for name in mod.__all__:
        value = getattr(mod, name)
        assert vars(mod)[name] is value
        if name in mod._EXPORTS:
            assert getattr(importlib.import_module(mod._EXPORTS[name], package), name) is value
        assert name in dir(mod)
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'no_such_name'"):
        mod.no_such_name  # noqa: B018


def test_the_cli_starts_without_torch_or_transformers():
    """`lorakit --help`, `--version` and `VERB --help` build the whole parser (the train config's
    reference included); doing that without importing torch or transformers is what keeps them
    well under a second (README "Development" records the timings)."""
    code = ("import sys; from lorakit.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'tokenizers', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
