"""The package's import graph keeps DESIGN.md's layers (unit tier; reads source with `ast`, imports nothing).

Every `import` in `leantune/` counts: at module level, inside functions (lazy imports) and under
`if TYPE_CHECKING:` (a lazy or typing-only import hides a dependency, it does not remove it). The rules:

1. **Layers point down.** DESIGN.md's order, top to bottom:
   `cli > recipes > eval > serve > train > data > methods > optim > quant > models > neutral`.
   A module imports modules of its own layer or of layers below it. So, among others,
   models/ imports nothing of methods|train|serve|recipes, methods/ nothing of train|serve|recipes,
   train/ nothing of serve|recipes. The package root (`leantune/__init__.py`, the public API) sits with cli.
   One named exception, `ALLOWED_UP`: models -> quant (the loader builds a 4-bit model at load time,
   DESIGN's data path "Model (fp32/bf16, or 4-bit via quant)"); quant in turn imports no models module
   (rule 1 again via `FORBIDDEN`), so the two never form a cycle.
2. **Neutral helpers sit at the bottom**: `ops/` (fused autograd ops and the fusable-linear protocol),
   `kernels/` (Triton kernels), `routing.py` (per-forward adapter routing), `fields.py` and `precision.py`
   (the device's compute dtype). Any layer may
   import them; they import only each other.
3. **The scheduler stays pure Python**: `serve/scheduler.py` and `serve/block_manager.py` import no torch,
   neither directly nor through the leantune modules they import; nor do the data readers (`data/base.py`,
   `readers.py`, `columnar.py`, `rows.py`, `chat.py`).
4. **No import cycles** between leantune modules (within a subpackage or across): a cycle makes the
   import order matter and a lazy import the only thing keeping it working. Lazy imports count; imports
   under `if TYPE_CHECKING:` do not (they never run: two modules may name each other's types).

Edges go to modules: `from .a import b` is an edge to `a.b` when that is a module, else to `a`.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "leantune"

ORDER = ["cli", "recipes", "eval", "serve", "train", "data", "methods", "optim", "quant", "models"]  # top to bottom
NEUTRAL = {"ops", "kernels", "routing", "fields", "precision"}
ALLOWED_UP = {("models", "quant")}
FORBIDDEN = {("quant", "models")}
TORCH_FREE = ("leantune.serve.scheduler", "leantune.serve.block_manager",
              # the data reader layer: rows are read, checked and templated without torch (issue 15)
              "leantune.data.base", "leantune.data.readers", "leantune.data.columnar", "leantune.data.rows",
              "leantune.data.chat")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file and package folder under root."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = [root.name, *p.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    for d in sorted(q for q in root.rglob("*") if q.is_dir() and q.name != "__pycache__"):
        out.setdefault(".".join([root.name, *d.relative_to(root).parts]), d)  # namespace packages too
    return out


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, typing only) for every import in the file: leantune modules resolved, others
    by their full name."""
    if path.is_dir():
        return []
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    typing_only = _typing_only(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, id(node) in typing_only) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in modules else target, node.lineno, id(node) in typing_only))
    return out


def graph(root: Path = ROOT) -> tuple[dict[str, Path], dict[str, list[tuple[str, int, bool]]]]:
    modules = module_files(root)
    return modules, {m: imports_of(m, p, modules) for m, p in modules.items()}


def layer(module: str) -> str:
    """The layer a leantune module belongs to: its folder, or the top-level module's own name."""
    parts = module.split(".")
    return "cli" if len(parts) == 1 or parts[1] == "__main__" else parts[1]  # `python -m leantune` is the CLI


def rank(layer_name: str) -> int:
    """Higher = lower in the stack; neutral helpers lowest."""
    return len(ORDER) if layer_name in NEUTRAL else ORDER.index(layer_name)


def layer_violations(modules, edges) -> list[str]:
    bad = []
    for m, targets in edges.items():
        src = layer(m)
        for t, line, _ in targets:
            if not t.startswith("leantune") or t not in modules:
                continue
            dst = layer(t)
            if src == dst:
                continue
            if src in NEUTRAL:
                ok = dst in NEUTRAL
            else:
                ok = rank(dst) > rank(src) or (src, dst) in ALLOWED_UP
            if not ok or (src, dst) in FORBIDDEN:
                bad.append(f"{m}:{line}: {src} -> {dst} ({t})")
    return bad


def torch_reached(start: str, modules, edges) -> list[str]:
    """The import chain from `start` to torch, through leantune modules only; [] when torch is not reached."""
    seen, stack = {start}, [(start, [start])]
    while stack:
        m, chain = stack.pop()
        for t, _, _ in edges.get(m, []):
            if t.split(".")[0] == "torch":
                return [*chain, t]
            if t.startswith("leantune") and t in modules and t not in seen:
                seen.add(t)
                stack.append((t, [*chain, t]))
    return []


def cycles(edges) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (or a module importing itself);
    TYPE_CHECKING imports left out."""
    inner = {m: sorted({t for t, _, typing in ts if t in edges and not typing}) for m, ts in edges.items()}
    index, low, on, stack, found, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in inner[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in inner[v]:
                found.append(sorted(comp))

    for v in sorted(inner):
        if v not in index:
            visit(v)
    return found


@pytest.fixture(scope="module")
def package():
    return graph()


def test_every_leantune_import_resolves(package):
    modules, edges = package
    missing = [f"{m}: {t}" for m, ts in edges.items() for t, _, _ in ts
               if t.startswith("leantune") and t not in modules]
    assert not missing, missing


def test_layers_point_down(package):
    bad = layer_violations(*package)
    assert not bad, "imports against DESIGN.md's layers:\n" + "\n".join(bad)


@pytest.mark.parametrize("module", TORCH_FREE)
def test_scheduler_stays_torch_free(package, module):
    chain = torch_reached(module, *package)
    assert not chain, f"{module} reaches torch: {' -> '.join(chain)}"


def test_no_import_cycles(package):
    found = cycles(package[1])
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_rules_catch_violations(tmp_path):
    """Each rule fails on a small package that breaks it (lazy and TYPE_CHECKING imports included)."""
    root = tmp_path / "leantune"
    files = {
        "__init__.py": "",
        "models/llama.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..methods.lora import X\n",
        "methods/lora.py": "def f():\n    from ..train import loop\n",
        "train/loop.py": "from ..serve.engine import E\n",
        "serve/engine.py": "",
        "serve/scheduler.py": "from .helper import h\n",
        "serve/helper.py": "import torch\n",
        "ops/a.py": "from ..models import llama\n",
        "data/x.py": "from .y import f\n",
        "data/y.py": "def f():\n    from . import x\n",
        "data/z.py": "from typing import TYPE_CHECKING\nfrom .x import f\nif TYPE_CHECKING:\n    from .z2 import T\n",
        "data/z2.py": "from .z import g\n",
        "models/gguf.py": "from ..quant import nf4\n",
        "quant/nf4.py": "from leantune.models.gguf import g\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    modules, edges = graph(root)
    bad = "\n".join(layer_violations(modules, edges))
    for want in ("models.llama:3: models -> methods", "methods.lora:2: methods -> train",
                 "train.loop:1: train -> serve", "ops.a:1: ops -> models", "quant.nf4:1: quant -> models"):
        assert f"leantune.{want}" in bad, bad
    assert "leantune.models.gguf:" not in bad  # the one allowed upward edge
    assert torch_reached("leantune.serve.scheduler", modules, edges)[-1] == "torch"
    assert not torch_reached("leantune.serve.engine", modules, edges)
    assert ["leantune.data.x", "leantune.data.y"] in cycles(edges)  # a lazy import closes a cycle
    assert not any("leantune.data.z" in c for c in cycles(edges))  # a TYPE_CHECKING one does not
