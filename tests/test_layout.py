"""The package's layout rules, read from the source of every module: no module imports another
that imports it back (directly or through others; imports inside functions count), and
tokenizer/ depends on nothing in llama_ref but the shared errors module."""
import ast
import importlib
import importlib.util
import pkgutil

# kernels/ and tokenizer/ sit beside llama_ref/ on disk and install inside it, so walking
# llama_ref/ alone does not find them
ROOTS = ("llama_ref", "llama_ref.kernels", "llama_ref.tokenizer")


def package_modules() -> dict[str, str]:
    """Every module of the package by dotted name, with its source file."""
    names = set(ROOTS)
    for root in ROOTS:
        names.update(info.name for info in pkgutil.walk_packages(importlib.import_module(root).__path__, root + "."))
    return {name: importlib.util.find_spec(name).origin for name in sorted(names)}


def imported(name: str, path: str, modules) -> set[str]:
    """The package's modules that `name` imports explicitly."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            # `from x import y` imports the module x.y when there is one, else a name of x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported(name, path, modules) - {name} for name, path in modules.items()}


def test_the_cycle_finder_finds_a_cycle_through_several_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_the_imports_of_the_package():
    graph = import_graph()
    assert {"llama_ref.nn.linear", "llama_ref.formats.gptq"} <= graph["llama_ref.formats.hf"]
    assert "llama_ref.decoding.generation" in graph["llama_ref.api"]
    assert "llama_ref.kernels.gptq" in graph["llama_ref.nn.linear"]   # kernels/ on disk, llama_ref.kernels installed


def test_no_module_imports_one_that_imports_it_back():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_the_tokenizer_depends_only_on_itself_and_the_errors():
    graph = import_graph()
    outside = {(name, target) for name, targets in graph.items() if name.startswith("llama_ref.tokenizer")
               for target in targets if not target.startswith("llama_ref.tokenizer") and target != "llama_ref.errors"}
    assert not outside
