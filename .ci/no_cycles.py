"""Fail if mpshm's modules import each other in a cycle (lazy imports in
functions count: grimp reads every import statement). The layers contract
in pyproject.toml orders the layers; this also covers modules of one layer."""

import sys

import grimp

graph = grimp.build_graph("mpshm")
modules = sorted(graph.modules)
index = {name: i for i, name in enumerate(modules)}
edges = {name: sorted(graph.find_modules_directly_imported_by(name)) for name in modules}


def strongly_connected() -> list[list[str]]:
    """Tarjan's algorithm, iterative."""
    counter = 0
    low: dict[str, int] = {}
    order: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in modules:
        if root in order:
            continue
        work = [(root, 0)]
        while work:
            node, at = work.pop()
            if at == 0:
                order[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            targets = [t for t in edges[node] if t in index]
            for i in range(at, len(targets)):
                target = targets[i]
                if target not in order:
                    work.append((node, i + 1))
                    work.append((target, 0))
                    break
                if target in on_stack:
                    low[node] = min(low[node], order[target])
            else:
                if low[node] == order[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
    return found


cycles = strongly_connected()
for component in cycles:
    print("import cycle among: " + ", ".join(component))
    for name in component:
        inside = [t for t in edges[name] if t in component]
        print(f"  {name} imports {', '.join(inside)}")
if cycles:
    sys.exit(1)
print(f"no import cycle among mpshm's {len(modules)} modules")
