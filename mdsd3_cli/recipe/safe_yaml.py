"""Safe YAML for recipes: yaml.safe_load's tags and values, but duplicate keys, runaway nesting and alias
bombs are refused with a message naming the line, and `1e-4` is a number (YAML 1.2; yaml.safe_load, which
follows YAML 1.1, reads an exponent without a dot as a string)."""

from __future__ import annotations

import re
from typing import Any

import yaml

MAX_DEPTH = 32
"""Deepest nesting of mappings and lists a recipe may have (real recipes need 4)."""
MAX_NODES = 100_000
"""Most YAML values a recipe may expand to, aliases counted at every use (guards against alias bombs)."""


class YamlError(ValueError):
    """A YAML text that cannot be used; `where` is `line N` or empty."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}" if where else message)
        self.where, self.message = where, message


class _TooComplex(yaml.YAMLError):
    """Nesting or alias expansion beyond the limits; `mark` is where it was found."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key, self.first, self.again = key, first, again


class _RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (same tags, same values) that refuses duplicate mapping keys, nesting deeper than
    MAX_DEPTH and documents that expand to more than MAX_NODES nodes."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._expanded = 0
        self._extents: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        alias = self.check_event(yaml.AliasEvent)
        mark = self.peek_event().start_mark
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooComplex(f"nested deeper than {MAX_DEPTH} levels", mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if alias and node.end_mark is None:  # the anchored collection is still open: it would contain itself
            raise _TooComplex("an alias refers to a collection that contains it", mark)
        size, height = self._extent(node) if alias else (1, 0)
        if self._depth + height >= MAX_DEPTH:
            raise _TooComplex(f"nested deeper than {MAX_DEPTH} levels through aliases", mark)
        self._expanded += size
        if self._expanded > MAX_NODES:
            raise _TooComplex(f"expands to more than {MAX_NODES:,} values (aliases counted at every use)", mark)
        return node

    def _extent(self, node: yaml.Node) -> tuple[int, int]:
        """(values, nesting height) `node` stands for with every alias expanded; memoised per node."""
        if id(node) not in self._extents:
            children: list[yaml.Node] = []
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [part for pair in node.value for part in pair]
            extents = [self._extent(child) for child in children]
            self._extents[id(node)] = (
                1 + sum(size for size, _ in extents),
                1 + max((height for _, height in extents), default=-1),
            )
        return self._extents[id(node)]

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            if key in first_seen:
                raise _DuplicateKey(key, first_seen[key], key_node.start_mark)
            first_seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_RecipeLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}  # a copy of every list: yaml.SafeLoader itself stays as it is
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _line(mark: yaml.Mark) -> str:
    return f"line {mark.line + 1}"


def load_yaml(text: str, name: str) -> Any:
    """The value of a YAML text with yaml.safe_load's semantics; YamlError for anything unusable. `name`
    stands for the text in pyyaml's messages (a file name)."""
    try:
        loader = _RecipeLoader(text)  # the reader refuses control characters here, before any parsing
    except yaml.reader.ReaderError as error:
        raise _character_error(text, error) from None
    try:
        return loader.get_single_data()
    except yaml.reader.ReaderError as error:
        raise _character_error(text, error) from None
    except _DuplicateKey as error:
        raise YamlError(
            _line(error.again),
            f"duplicate key {error.key!r} (first at {_line(error.first)}); each key may appear once in a mapping",
        ) from None
    except _TooComplex as error:
        raise YamlError(_line(error.mark), f"invalid recipe: {error.problem}") from None
    except RecursionError:
        raise YamlError("", f"invalid recipe: nested too deeply (at most {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as error:
        raise YamlError("", f"invalid YAML: {str(error).replace('<unicode string>', name)}") from None
    finally:
        loader.dispose()


def _character_error(text: str, error: yaml.reader.ReaderError) -> YamlError:
    """A YamlError naming the line, column and code of a character YAML does not allow (a control character)."""
    before = text[: error.position]
    column = error.position - (before.rfind("\n") + 1) + 1
    return YamlError(
        f"line {before.count(chr(10)) + 1}",
        f"column {column}: character U+{error.character:04X} is not allowed in YAML (a control character); remove it",
    )
