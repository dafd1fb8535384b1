"""Reading YAML safely (``yaml.safe_load``'s loader, with a guard against aliases that expand without bound) and
setting a dotted key of a nested mapping."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdray.errors import ConfigError


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Parse a YAML mapping safely; syntax errors name the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"file not found (looked in {p.resolve().parent})", file=p)
    # Aliases share one node, so a few lines of aliases-of-aliases ("billion laughs") compose instantly but
    # expand to hundreds of millions of values once validated or printed. Count the expanded size on the
    # composed node graph (memoised per node, so linear in the file) and refuse before constructing.
    max_values = 100_000
    try:
        loader = yaml.SafeLoader(p.read_text())
        try:
            root = loader.get_single_node()
            sizes: dict[int, int] = {}
            started: set[int] = set()
            stack: list[tuple[yaml.Node, bool]] = [(root, False)] if root is not None else []
            while stack:
                node, finished = stack.pop()
                if isinstance(node, yaml.MappingNode):
                    children = [c for pair in node.value for c in pair]
                elif isinstance(node, yaml.SequenceNode):
                    children = list(node.value)
                else:
                    children = []
                if finished:
                    sizes[id(node)] = min(max_values + 1, 1 + sum(sizes[id(c)] for c in children))
                    continue
                if id(node) in sizes:
                    continue
                if id(node) in started:  # on the current path: an alias to one of its own ancestors
                    raise ConfigError(f"a YAML alias refers to itself (line {node.start_mark.line + 1}); "
                                      "recursive values are not allowed", file=p)
                started.add(id(node))
                stack.append((node, True))
                stack.extend((c, False) for c in children if id(c) not in sizes)
            if root is not None and sizes[id(root)] > max_values:
                raise ConfigError(f"YAML aliases expand to more than {max_values:,} values; refusing to read it "
                                  "(nested anchors and aliases, a 'billion laughs'?)", file=p)
            data = loader.construct_document(root) if root is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"YAML syntax error at {where}{e.problem or e}", file=p) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"YAML error: {e}", file=p) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not a text file: {e}", file=p) from None
    if data is None:
        raise ConfigError("the file is empty", file=p)
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping of fields at the top level, got {type(data).__name__}", file=p)
    return data


def dotted_set(data: dict[str, Any], path: str, value: Any) -> None:
    """``dotted_set(d, "train.lr", 0.01)``: set a nested key, creating mappings on the way."""
    parts = path.split(".")
    cur = data
    for part in parts[:-1]:
        nxt = cur.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[part] = nxt
        cur = nxt
    cur[parts[-1]] = value
