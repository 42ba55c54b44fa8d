"""The shape of the code: one import root, no import cycles, layers that import only downward, and a wheel that
installs only `leanfit`, beside HF's `kernels` distribution in either order."""

import ast
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"leanfit": ROOT / "src" / "leanfit", "leanfit.lstm_core": ROOT / "lstm_core",
            "leanfit.kernels": ROOT / "kernels", "leanfit.train": ROOT / "train"}
OLD_NAMES = ("kernels", "train", "lstm_core")
FORBIDDEN = [("leanfit.kernels", "leanfit.train"), ("leanfit.kernels", "leanfit.lstm_core"),
             ("leanfit.lstm_core", "leanfit.train")]
# train/'s wings and what each may import; "core" is the flat train/ top level, which every wing uses. The core
# itself reaches only the bottom: checkpointing, the kernels and the bitsandbytes import (model.quant). train/hf.py
# sits at the top level as `leanfit.train.hf` but belongs to the integrations wing it re-exports.
WINGS = ("charlm", "checkpointing", "commands", "evaluation", "integrations", "memory", "model", "recipe")
ALLOWED = {
    "core": {"core", "checkpointing", "kernels", "model.quant"},
    "checkpointing": {"checkpointing"},
    "model": {"model", "core", "checkpointing"},
    "memory": {"memory", "core", "model", "checkpointing", "kernels"},
    "evaluation": {"evaluation", "core", "model", "checkpointing"},
    "recipe": {"recipe", "core", "model", "checkpointing", "memory", "evaluation"},
    "charlm": {"charlm", "core", "checkpointing", "memory", "evaluation", "kernels", "lstm_core"},
    "commands": {"commands", "core", "model", "checkpointing", "memory", "evaluation", "recipe", "charlm"},
    "integrations": {"integrations", "core", "model", "memory", "checkpointing", "kernels"},
}
MAX_TOP_LEVEL = 12  # modules at train/'s top level, __init__ aside
MAX_LINES = 400
DEFERRED = "# deferred:"  # a function-level import of the package's own code must say why, on its line


def module_files(packages):
    """{module name: path} of every .py file of the packages and their sub-packages."""
    modules = {}
    for package, folder in packages.items():
        for path in sorted(Path(folder).rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if not all((Path(folder, *parts[:i]) / "__init__.py").is_file() for i in range(1, len(parts))):
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            modules[".".join([package, *parts])] = path
    return modules


def _resolve(module, path, node):
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph(packages):
    """({module: {imported modules}}, [problems]) from the source, without importing anything."""
    modules = module_files(packages)
    graph, problems = {m: set() for m in modules}, []
    for module, path in modules.items():
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        in_function = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level == 0:
                    targets = [node.module]
                else:
                    base = _resolve(module, path, node)
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            where = f"{path.parent.name}/{path.name}:{node.lineno}"
            for target in targets:
                if target.split(".")[0] in OLD_NAMES:
                    problems.append(f"{where} imports the old top-level name {target!r}")
                if not target.startswith("leanfit"):
                    continue
                if id(node) in in_function and DEFERRED not in lines[node.lineno - 1]:
                    problems.append(f"{where} imports {target} inside a function without a '{DEFERRED}' reason")
                parts = target.split(".")
                for i in range(1, len(parts) + 1):
                    name = ".".join(parts[:i])
                    if name in modules and not module.startswith(name + ".") and name != module:
                        graph[module].add(name)
    return graph, problems


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_cycles_no_upward_imports_no_old_names_no_unexplained_deferred_imports():
    graph, problems = import_graph(PACKAGES)
    assert len(graph) > 60, sorted(graph)
    assert not problems, "\n".join(problems)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    for low, high in FORBIDDEN:
        bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith(low) for t in ts if t.startswith(high))
        assert not bad, bad


def wing_of(module: str) -> str | None:
    """train's wing of a module ("core" for train/'s top level, "model.quant" for that one leaf), else its part."""
    parts = module.split(".")
    if parts[:2] != ["leanfit", "train"]:
        return parts[1] if len(parts) > 1 else None
    if len(parts) == 2:
        return "core"
    if parts[2:] == ["hf"]:
        return "integrations"  # train/hf.py: the public face of the integrations wing
    if parts[2] in WINGS:
        return "model.quant" if parts[2:4] == ["model", "quant"] else parts[2]
    return "core"


def wing_violations(graph) -> list[str]:
    bad = []
    for module, targets in graph.items():
        wing = wing_of(module)
        if wing not in ALLOWED and wing != "model.quant":
            continue
        allowed = ALLOWED.get(wing, ALLOWED["model"])
        for target in (t for t in targets if not any(o.startswith(t + ".") for o in targets)):
            to = wing_of(target)
            if to == "model.quant" and "model.quant" not in allowed and "model" in allowed:
                to = "model"
            if to not in allowed and to is not None:
                bad.append(f"{module} ({wing}) -> {target} ({to})")
    return sorted(bad)


def test_each_wing_imports_only_its_allowed_neighbours():
    graph, _ = import_graph(PACKAGES)
    assert not wing_violations(graph), "\n".join(wing_violations(graph))


def test_only_commands_parse_argv():
    """The library never imports `commands/`, and argparse and sys.argv appear only there."""
    graph, _ = import_graph(PACKAGES)
    entry = ("leanfit.train.commands", "leanfit.__main__")
    bad = sorted(f"{m} -> {t}" for m, ts in graph.items() if not m.startswith(entry)
                 for t in ts if t.startswith("leanfit.train.commands"))
    assert not bad, bad
    for module, path in module_files(PACKAGES).items():
        if module.startswith(entry):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            uses = (isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names)
                    or isinstance(node, ast.ImportFrom) and node.module == "argparse"
                    or isinstance(node, ast.Attribute) and node.attr == "argv"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys")
            assert not uses, f"{path.relative_to(ROOT)}:{node.lineno} parses the command line outside train/commands/"


def test_small_files_and_a_small_train_top_level():
    top = [p for p in (ROOT / "train").glob("*.py") if p.name != "__init__.py"]
    assert len(top) <= MAX_TOP_LEVEL, sorted(p.name for p in top)
    long = {f"{path.relative_to(ROOT)}: {n}" for path in module_files(PACKAGES).values()
            if (n := path.read_text(encoding="utf-8").count("\n")) > MAX_LINES}
    assert not long, long


def test_the_checker_sees_a_cycle_an_upward_import_and_an_old_name(tmp_path):
    kernels, train = tmp_path / "kernels", tmp_path / "train"
    kernels.mkdir()
    train.mkdir()
    (kernels / "__init__.py").write_text("")
    (kernels / "a.py").write_text("from ..train.b import x\n")
    (train / "__init__.py").write_text("")
    (train / "b.py").write_text("from ..kernels import a\nimport kernels\n\ndef f():\n    from . import c\n")
    (train / "c.py").write_text("")
    for wing in ("memory", "recipe", "commands"):
        (train / wing).mkdir()
        (train / wing / "__init__.py").write_text("")
    (train / "memory" / "m.py").write_text("from ..recipe.r import x\n")
    (train / "recipe" / "r.py").write_text("from ..commands.k import x\n")
    (train / "commands" / "k.py").write_text("from ..memory import m\n")
    packages = {"leanfit.kernels": kernels, "leanfit.train": train}
    graph, problems = import_graph(packages)
    assert find_cycle(graph) == ["leanfit.kernels.a", "leanfit.train.b", "leanfit.kernels.a"]
    assert "leanfit.train.b" in graph["leanfit.kernels.a"]
    assert "leanfit.train.recipe.r" in graph["leanfit.train.memory.m"]
    assert any("old top-level name 'kernels'" in p for p in problems)
    assert any("inside a function" in p for p in problems)
    assert wing_violations(graph) == ["leanfit.train.memory.m (memory) -> leanfit.train.recipe.r (recipe)",
                                      "leanfit.train.recipe.r (recipe) -> leanfit.train.commands.k (commands)"]


def test_finetune_recipe_stays_small():
    lines = (ROOT / "train" / "recipe" / "finetune.py").read_text(encoding="utf-8").count("\n")
    assert lines <= 350, f"train/recipe/finetune.py has {lines} lines; the recipe orchestrates, its pieces live beside"


HF_KERNELS = "kernels==0.17.2"


def _run(*cmd, cwd=None):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist, source = tmp_path_factory.mktemp("dist"), tmp_path_factory.mktemp("source") / "leanfit"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "dist", "runs", "out", "*.egg-info",
                                                               "__pycache__"))
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, source)
    wheels = list(dist.glob("leanfit-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_the_wheel_holds_only_the_leanfit_root(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert zf.read(top_level).decode().split() == ["leanfit"]
    assert {n.split("/")[0] for n in names} == {"leanfit", wheel.name.split("-py")[0] + ".dist-info"}
    for module in ("leanfit/__init__.py", "leanfit/kernels/lce/interface.py", "leanfit/lstm_core/modules.py",
                   "leanfit/train/recipe/finetune.py", "leanfit/train/data/dracula.txt"):
        assert module in names, module


CHECK = """
import kernels, leanfit, torch
from leanfit.kernels import linear_cross_entropy
from leanfit.train.evaluation.probe import builtin_prefixes
assert builtin_prefixes()
assert hasattr(kernels, "get_kernel") and "site-packages" in kernels.__file__, kernels.__file__
assert "site-packages" in leanfit.__file__, leanfit.__file__
h, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([1, 2, 3, 4])
ref = torch.nn.functional.cross_entropy(h @ w.T, y)
assert torch.allclose(linear_cross_entropy(h, w, y, impl="chunked"), ref, atol=1e-6)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", [("leanfit", "kernels"), ("kernels", "leanfit")], ids=["leanfit-first",
                                                                                         "kernels-first"])
def test_leanfit_and_hf_kernels_share_a_venv_in_either_order(wheel, tmp_path_factory, order):
    """HF's `kernels` owns the top-level `kernels`; ours is `leanfit.kernels`. Both import, whichever came first,
    and removing one leaves the other whole. torch comes from this test's own environment (a .pth line)."""
    wheels = tmp_path_factory.getbasetemp() / "hf-kernels-wheels"
    if not wheels.is_dir():
        _run(sys.executable, "-m", "pip", "download", "-q", "-d", wheels, HF_KERNELS)
    venv = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    site = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip()
    Path(site, "zz_test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = {"leanfit": ["--no-deps", wheel], "kernels": ["--no-index", "--find-links", wheels, HF_KERNELS]}
    env_pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for name in order:
        _run(*env_pip, *install[name])
    _run(python, "-c", CHECK, cwd=venv)
    first, second = order
    _run(python, "-m", "pip", "uninstall", "-q", "-y", first)
    probe = "import kernels; kernels.get_kernel" if second == "kernels" else \
        "import leanfit.kernels.lce, leanfit.train.commands.finetune"
    _run(python, "-c", probe, cwd=venv)
    assert os.path.isdir(Path(site) / second)


def test_ruff_is_clean_so_the_old_names_stay_banned():
    """`pyproject.toml`'s ruff rules, TID251 (the old top-level names) among them, over the whole tree."""
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    done = subprocess.run([ruff, "check", "--no-cache", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]


def test_the_module_listing_in_docs_is_what_the_docstrings_say():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "layout_doc.py"), "--check"], capture_output=True)
    assert done.returncode == 0, "docs/layout.md's module listing is stale: run `python scripts/layout_doc.py`"
