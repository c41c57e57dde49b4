"""The layout of each package, read from its source with `ast` (nothing is imported): no import cycle between its
modules, nothing imported that it must not depend on, no source file too long to hold in one head. Every import
statement counts, at module level and inside functions: an import deferred into a function hides a cycle, it does not
remove it. The few cycles a package keeps on purpose are listed edge by edge in ALLOWED_EDGES, each with the functions
whose imports may close it and the reason. Also: the names that moved between modules stay importable from their old
homes.

The helpers take a package name, so the same checks can cover another package by adding it to PACKAGES.
"""

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

# package -> the top-level names it must never import (phixtral_kernels is the kernels alone: the model uses them,
# never the other way round)
PACKAGES = {"phixtral_kernels": ("phixtral",), "phixtral": ()}

# package -> {(module, imported module): (the functions whose imports make that edge, why it may close a cycle)}.
# These edges are left out of the cycle search; an import of the same module anywhere else in the file is not.
ALLOWED_EDGES = {
    "phixtral": {
        ("phixtral.model", "phixtral.weights"): (
            ("Phixtral.from_pretrained", "Phixtral.save_pretrained"),
            "convenience methods: loading builds a Phixtral, so the loader imports the model and the model's "
            "classmethod can only import the loader when called",
        ),
        ("phixtral.model", "phixtral.generate"): (
            ("Phixtral.generate", "Phixtral.chat"),
            "convenience methods: generation drives a Phixtral, so phixtral.generate imports the model and the "
            "model's methods can only import it when called",
        ),
    },
}


def module_files(package: str, root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: source file} of every module of `package` (a folder under root), subpackages included."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_in(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """(absolute module name, imported name or None, line) for every import statement of the file, at any depth:
    `import a.b` -> ("a.b", None), `from .x import y` inside package p -> ("p.x", "y")."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found += [(source, alias.name, node.lineno) for alias in node.names]
    return found


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{module: the modules of the same package it imports}. `from p import name` is an edge to p.name where that is a
    module, else to p. Importing a submodule runs its parent packages' __init__ first: those implied edges are left
    out, as Python never leaves a submodule waiting on its parent. A module naming itself (aot's __main__ guard, which
    re-imports it under its package name) is no edge either."""
    modules = module_files(package, root)
    graph = {}
    for module, path in modules.items():
        edges = set()
        for source, name, _ in imports_in(module, path):
            target = f"{source}.{name}" if name and f"{source}.{name}" in modules else source
            if target in modules and target != module:
                edges.add(target)
        graph[module] = edges
    return graph


def import_scopes(package: str, module: str, root: Path = ROOT) -> dict[str, set[str]]:
    """{imported module: the qualified names of the functions holding its imports ("" at module level)} for one
    module of `package`, resolved as in `import_graph` (`from p import m` counts for p.m where that is a module)."""
    modules = module_files(package, root)
    path = modules[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    spans = []  # (first line, last line, qualified name) of every function, innermost last among overlapping ones

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = prefix + child.name
                if not isinstance(child, ast.ClassDef):
                    spans.append((child.lineno, child.end_lineno, name))
                walk(child, name + ".")
            else:
                walk(child, prefix)

    walk(tree, "")
    scopes = {}
    for source, name, line in imports_in(module, path):
        target = f"{source}.{name}" if name and f"{source}.{name}" in modules else source
        inner = [n for first, last, n in spans if first <= line <= last]
        scopes.setdefault(target, set()).add(inner[-1] if inner else "")
    return scopes


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted: [] when acyclic."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_imports(package: str, forbidden, root: Path = ROOT) -> list[str]:
    """ "module:line imports name" for every import (at any depth) of a top-level name in `forbidden` or below it."""
    offenders = []
    for module, path in module_files(package, root).items():
        for source, name, line in imports_in(module, path):
            if source.split(".")[0] in forbidden:
                offenders.append(f"{module}:{line} imports {source}" + (f".{name}" if name else ""))
    return offenders


def long_files(package: str, max_lines: int = MAX_LINES, root: Path = ROOT) -> list[str]:
    """ "path: lines" for every source file of `package` over max_lines (the tuned JSON tables are data, not
    counted)."""
    lengths = {
        path: len(path.read_text(encoding="utf-8").splitlines()) for path in module_files(package, root).values()
    }
    return [f"{path.relative_to(root)}: {n}" for path, n in lengths.items() if n > max_lines]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_import_cycle(package):
    graph = import_graph(package)
    assert len(graph) > 1 and any(graph.values()), f"{package}: no modules or no imports found"
    for module, target in ALLOWED_EDGES.get(package, {}):
        graph[module].discard(target)
    assert cycles(graph) == []


@pytest.mark.parametrize("package", sorted(ALLOWED_EDGES))
def test_allowed_edges_are_only_the_listed_functions(package):
    """Each allowed edge exists (no stale entry), and only the functions listed for it import that module."""
    for (module, target), (functions, why) in ALLOWED_EDGES[package].items():
        assert why, f"{module} -> {target}: no reason given"
        scopes = import_scopes(package, module)
        assert target in scopes, f"{module} no longer imports {target}: drop the entry"
        assert scopes[target] <= set(functions), f"{module} imports {target} in {sorted(scopes[target])}"


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_forbidden_import(package):
    assert forbidden_imports(package, PACKAGES[package]) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_no_source_file_over_the_line_limit(package):
    assert long_files(package) == []


def _write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_what_is_planted(tmp_path):
    """A cycle closed by an import inside a function, one through `from . import`, a forbidden import inside a
    function and an overlong file are found. A module naming itself adds no edge, nor does the import of the parent
    package that importing any submodule implies; `from pkg import a` is an edge to the module pkg.a, `import pkg` one
    to the package."""
    _write_package(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "from . import b\n\ndef f():\n    return b\n",
        "b.py": "import pkg.c\n",
        "c.py": "def g():\n    from .a import f\n\n    return f\n",
        "d.py": "from . import e\n",
        "e.py": "from .d import x\n\ndef h():\n    import phixtral.model\n",
        "ok.py": "import pkg\nfrom pkg import a\n\nif __name__ == '__main__':\n    from pkg.ok import main\n",
        "sub/__init__.py": "from .. import ok\n",
        "long.py": "x = 1\n" * (MAX_LINES + 1),
    })  # fmt: skip
    graph = import_graph("pkg", tmp_path)
    assert graph["pkg.ok"] == {"pkg", "pkg.a"} and graph["pkg.sub"] == {"pkg.ok"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"], ["pkg.d", "pkg.e"]]
    assert forbidden_imports("pkg", ("phixtral",), tmp_path) == ["pkg.e:4 imports phixtral.model"]
    assert long_files("pkg", root=tmp_path) == [f"pkg/long.py: {MAX_LINES + 1}"]
    assert import_scopes("pkg", "pkg.c", tmp_path) == {"pkg.a": {"g"}}
    assert import_scopes("pkg", "pkg.ok", tmp_path) == {"pkg": {""}, "pkg.a": {""}, "pkg.ok": {""}}


def test_import_scopes_name_methods_and_nested_functions(tmp_path):
    """An import is attributed to the innermost function around it, by qualified name through classes."""
    _write_package(tmp_path, {
        "__init__.py": "",
        "m.py": "import pkg.n\n\nclass C:\n    def f(self):\n        from . import n\n\n"
                "        def inner():\n            from .n import x\n\n    @classmethod\n    def g(cls):\n"
                "        from .o import y\n",
        "n.py": "x = 1\n",
        "o.py": "y = 1\n",
    })  # fmt: skip
    assert import_scopes("pkg", "pkg.m", tmp_path) == {"pkg.n": {"", "C.f", "C.f.inner"}, "pkg.o": {"C.g"}}


def test_old_import_paths_still_work():
    """Names that moved to their own modules stay importable from where they were, as the same objects."""
    from phixtral_kernels import (
        aot,
        aot_compile,
        checks,
        gemm_configs,
        grouped_gemm,
        grouped_gemm_kernel,
        launches,
        moe,
        moe_backward,
        moe_triton,
    )

    moved = [
        (grouped_gemm, gemm_configs, ["GemmConfig", "SM90_PREFILL", "SM90_PREFILL_MIN_ROWS", "heuristic_configs",
                                      "moe_gemm_configs", "quantized_config", "topk_sum_fits"]),
        (grouped_gemm, grouped_gemm_kernel, ["HAS_TENSOR_DESCRIPTORS", "_grouped_gemm_kernel"]),
        (moe_backward, moe_triton, ["DECODE_MAX_TOKENS", "DECODE_PATHS", "decode_path", "triton_moe_forward"]),
        (moe, checks, ["BACKENDS", "TRITON_DTYPES", "check_moe_inputs"]),
        (aot, launches, ["KERNEL_MODULES", "PHIXTRAL_SHAPE", "Launch", "empty_quantized", "parse_quant_scheme",
                         "record_backward_launches", "record_launches", "recording"]),
        (aot, aot_compile, ["compile_launch", "default_jobs", "launch_key"]),
    ]  # fmt: skip
    for old, new, names in moved:
        for name in names:
            assert getattr(old, name) is getattr(new, name), f"{old.__name__}.{name}"


def test_checkpoint_writer_names_stay_importable_from_weights():
    """The writing half of phixtral.weights moved to phixtral.checkpoint_writer; the old imports give the same
    objects."""
    from phixtral import checkpoint_writer, weights
    from phixtral.weights import save_msft_checkpoint

    assert save_msft_checkpoint is checkpoint_writer.save_msft_checkpoint
    for name in ("check_checkpoint_destination", "checkpoint_dtype", "write_msft_files", "_DTYPES"):
        assert getattr(weights, name) is getattr(checkpoint_writer, name), name


def test_tuned_configs_module_is_a_deprecated_alias():
    sys.modules.pop("phixtral_kernels.tuned_configs", None)
    with pytest.warns(DeprecationWarning, match="phixtral_kernels.gemm_configs"):
        tuned_configs = importlib.import_module("phixtral_kernels.tuned_configs")
    from phixtral_kernels import gemm_configs

    for name in tuned_configs.__all__ + ["FORMAT", "DTYPES", "DEFAULT_SHARED_BYTES", "current_source"]:
        assert getattr(tuned_configs, name) is getattr(gemm_configs, name), name
