"""YAML with line numbers, for error messages that point at file:line.

Owns: loading YAML (config and fleet repo) into plain dicts/lists whose mappings
remember the line of each key. Duplicate keys are errors (PyYAML silently keeps the
last one, which would hide a typo in a fleet repo).
Must not: read files itself; callers pass text and the name to report.
"""

from __future__ import annotations

from typing import Any

import yaml

try:  # the C loader is ~10x faster; fall back when libyaml is missing
    _Base = yaml.CSafeLoader  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover
    _Base = yaml.SafeLoader


class LineDict(dict):
    """A mapping that knows where it and each of its keys stand in the source."""

    __slots__ = ("src", "line", "key_lines")

    def __init__(self, src: str = "", line: int = 0) -> None:
        super().__init__()
        self.src = src
        self.line = line
        self.key_lines: dict[Any, int] = {}

    def where(self, key: Any = None) -> str:
        line = self.key_lines.get(key, self.line) if key is not None else self.line
        return f"{self.src}:{line}" if line else self.src


class YamlError(Exception):
    def __init__(self, message: str, src: str, line: int | None) -> None:
        super().__init__(message)
        self.src = src
        self.line = line

    @property
    def location(self) -> str:
        return f"{self.src}:{self.line}" if self.line else self.src


def _loader_for(src: str) -> type:
    class Loader(_Base):  # type: ignore[misc, valid-type]
        pass

    def construct_mapping(loader: Any, node: yaml.MappingNode) -> LineDict:
        loader.flatten_mapping(node)
        out = LineDict(src, node.start_mark.line + 1)
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise YamlError("a mapping key must be a scalar", src,
                                key_node.start_mark.line + 1) from None
            if key in out:
                raise YamlError(
                    f"duplicate key {key!r} (first at line {out.key_lines[key]})",
                    src, key_node.start_mark.line + 1)
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out

    def construct_document(loader: Any, node: yaml.Node) -> Any:
        _check_expansion(node, src)
        return base_construct_document(loader, node)

    base_construct_document = _Base.construct_document
    Loader.construct_document = construct_document
    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


MAX_NODES = 1_000_000  # nodes of the document with every alias expanded


def _check_expansion(root: yaml.Node, src: str) -> None:
    """Refuse a "billion laughs": anchors and aliases let 1 KB of YAML stand for 10^9
    nodes. PyYAML shares aliased nodes, but every consumer that walks the value (str(),
    merging, matching) expands it. Count each node as often as it is reached."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a recursive alias counts once (construction refuses it anyway)
        total = 1
        if isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        elif isinstance(node, yaml.SequenceNode):
            total += sum(size(v) for v in node.value)
        sizes[key] = total = min(total, MAX_NODES + 1)
        return total

    if size(root) <= MAX_NODES:
        return
    # name the first top-level entry that holds the expansion
    line = root.start_mark.line + 1
    children = ([v for _, v in root.value] if isinstance(root, yaml.MappingNode)
                else root.value if isinstance(root, yaml.SequenceNode) else [])
    for child in children:
        if sizes.get(id(child), 0) > MAX_NODES // 2:
            line = child.start_mark.line + 1
            break
    raise YamlError(f"refused: anchors and aliases expand to more than {MAX_NODES} nodes "
                    f"(an alias bomb?)", src, line)


def load(text: str | bytes, src: str) -> Any:
    """Parse one YAML document; errors become YamlError with the source line."""
    try:
        return yaml.load(text, Loader=_loader_for(src))  # noqa: S506 - safe loader subclass
    except YamlError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise YamlError(f"malformed YAML: {e.problem or e.context}", src, line) from None
    except yaml.YAMLError as e:
        raise YamlError(f"malformed YAML: {e}", src, None) from None
    except RecursionError:
        raise YamlError("refused: nested too deeply", src, None) from None
