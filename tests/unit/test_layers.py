"""The package's layers: no import circles, and no arrow from a lower layer up.

Imports are read from the source with ``ast``, every one of them: at module level,
inside functions (lazy imports) and under ``TYPE_CHECKING``. A lazy import hides a
circle from ``python -c 'import snpd.x'`` but not from the layering, so it counts.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "snpd"

# Lowest first. A module may import modules of its own layer and of the layers
# before it; a module of a layer up to and including "config" may import only
# modules listed here (so a new upward arrow cannot hide in an unlisted module).
# A name stands for that module and everything below it.
LAYERS: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("base", ("snpd", "snpd.errors", "snpd.schema", "snpd.abi")),
    # the pure core: parsing and verification, no I/O (the KBS protocol's sans-I/O half)
    ("trust", ("snpd.trust", "snpd.kbs.jcs", "snpd.kbs.protocol", "snpd.kbs.jwe")),
    ("io", ("snpd.files", "snpd.kds.urls", "snpd.kds.client", "snpd.kds.thim")),
    # The KBS protocol: pure messages, JCS and JWE, the allow rules, and its HTTP client.
    ("kbs", ("snpd.kbs",)),
    ("emulator", ("snpd.emulator",)),  # the software platform under the device layer
    ("device", ("snpd.device",)),
    ("config", ("snpd.config",)),
    ("service", ("snpd.access", "snpd.scheduler", "snpd.vmpck", "snpd.broker",
                 "snpd.events", "snpd.secrets", "snpd.service")),
    ("daemon", ("snpd.daemon",)),
)
CHECKED_UP_TO = "config"

# Circles another change removes; each pair goes when that change is merged.
KNOWN_CIRCLES: FrozenSet[FrozenSet[str]] = frozenset()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> Dict[str, Set[str]]:
    """Every snpd module and the snpd modules it imports anywhere in its source."""
    # snpd/_bundled is third-party code (dbus-fast), copied in by the packaging.
    sources = {module_name(p): p for p in PACKAGE.rglob("*.py")
               if "_bundled" not in p.relative_to(PACKAGE).parts}
    graph: Dict[str, Set[str]] = {}
    for name, path in sources.items():
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{name}: relative import"
                base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in sources else base)
        graph[name] = {t for t in targets if t in sources and t != name}
    return graph


def layer_of(module: str) -> Optional[int]:
    best: Optional[Tuple[int, int]] = None  # (length of the matching name, layer)
    for index, (_, names) in enumerate(LAYERS):
        for prefix in names:
            inside = module == prefix or (prefix != "snpd" and module.startswith(prefix + "."))
            if inside and (best is None or len(prefix) > best[0]):
                best = (len(prefix), index)
    return None if best is None else best[1]


def circles(graph: Dict[str, Set[str]]) -> List[FrozenSet[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[FrozenSet[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def upward_arrows(graph: Dict[str, Set[str]]) -> List[str]:
    checked = [name for name, _ in LAYERS].index(CHECKED_UP_TO)
    bad = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        if mine is None:
            continue
        for target in sorted(targets):
            theirs = layer_of(target)
            if theirs is None and mine <= checked:
                bad.append(f"{module} -> {target} (not in any layer)")
            elif theirs is not None and theirs > mine:
                bad.append(f"{module} ({LAYERS[mine][0]}) -> {target} ({LAYERS[theirs][0]})")
    return bad


def test_no_import_circles() -> None:
    found = [sorted(c) for c in circles(import_graph()) if c not in KNOWN_CIRCLES]
    assert found == []


def test_known_circles_still_exist() -> None:
    """An allow-listed circle that is gone must leave the list, or it would hide a new one."""
    assert set(circles(import_graph())) >= KNOWN_CIRCLES


def test_no_arrow_from_a_lower_layer_up() -> None:
    assert upward_arrows(import_graph()) == []


@pytest.mark.parametrize("graph, expected", [
    ({"snpd.device.select": {"snpd.config"}, "snpd.config": set()},
     ["snpd.device.select (device) -> snpd.config (config)"]),
    ({"snpd.trust.x509": {"snpd.kds.cache"}, "snpd.kds.cache": set()},
     ["snpd.trust.x509 -> snpd.kds.cache (not in any layer)"]),
    ({"snpd.trust.x509": {"snpd.kds.client"}, "snpd.kds.client": set()},
     ["snpd.trust.x509 (trust) -> snpd.kds.client (io)"]),
    ({"snpd.config": {"snpd.device.select"}, "snpd.device.select": set()}, []),
])
def test_the_layer_check_sees_an_upward_arrow(graph: Dict[str, Set[str]],
                                              expected: List[str]) -> None:
    assert upward_arrows(graph) == expected


def test_the_circle_check_sees_a_lazy_circle() -> None:
    graph = {"snpd.a": {"snpd.b"}, "snpd.b": {"snpd.c"}, "snpd.c": {"snpd.a"}, "snpd.d": set()}
    assert circles(graph) == [frozenset({"snpd.a", "snpd.b", "snpd.c"})]
