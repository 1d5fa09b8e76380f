"""`--set a.b.c=value` overrides applied to raw recipe data before validation (generate and train recipes)."""

from __future__ import annotations

from typing import Any

from mdsd3_cli.recipe.safe_yaml import YamlError, load_yaml


def apply_override(data: dict[str, Any], override: str) -> str:
    """Set one field from `dotted.key=value`; the value is read as YAML (`20` an int, `[0.1, 0.5]` a list).

    List items are addressed by index or by their `name` (`variants.rain.repeats=2`); missing mappings are
    created. Returns the field set, with list items as indexes (`variants.0.repeats`). Raises ValueError with
    a message naming the part that does not fit.
    """
    key, equals, text = override.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts):
        raise ValueError("expected FIELD=VALUE with a dotted field, e.g. sampling.steps=20")
    try:
        value = load_yaml(text, "--set value")
    except YamlError as error:
        raise ValueError(f"value is not valid YAML: {error}") from None
    node: Any = data
    resolved: list[str] = []
    for depth, part in enumerate(parts):
        where = ".".join(parts[:depth]) or "recipe"
        if isinstance(node, list):
            names = [item.get("name") if isinstance(item, dict) else None for item in node]
            if part.isdigit() and int(part) < len(node):
                slot: int | str = int(part)
            elif part in names:
                slot = names.index(part)
            else:
                raise ValueError(f"{where} is a list of {len(node)}; {part!r} is neither an index nor a name in it")
        elif isinstance(node, dict):
            slot = part
            if depth < len(parts) - 1 and node.get(part) is None:
                node[part] = {}
        else:
            raise ValueError(f"{where} is not a mapping or a list")
        resolved.append(str(slot))
        if depth == len(parts) - 1:
            node[slot] = value
        else:
            node = node[slot]
    return ".".join(resolved)
