"""The one YAML loader for validated files (topology, scenarios): parse, validate with a pydantic
model, and on a refusal name the source, the line and the field path."""

from __future__ import annotations

from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from shapeshifter.common.errors import InvalidArgument

M = TypeVar("M", bound=BaseModel)


def parse_yaml_model(text: str, model: type[M], source: str, what: str) -> M:
    """text as `model`. what: the document's name in errors and the field of a top-level refusal
    ("topology", "scenario"). InvalidArgument names `source`, the line and the field path."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{source}: not valid YAML: {e}", field=what) from e
    if not isinstance(data, dict):
        raise InvalidArgument(f"{source}: the top level must be a mapping", field=what)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        path = ".".join(str(p) for p in err["loc"])
        line = line_of(node, err["loc"])
        where = f" (line {line})" if line else ""
        raise InvalidArgument(f"{source}{where}: {path or what}: {err['msg']}",
                              field=path or what) from e


def line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the deepest YAML node on the error's path that exists."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == key), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            match = node.value[key]
        else:
            match = None
        if match is None:
            break
        node = match
        line = node.start_mark.line + 1
    if line is None and node is not None and hasattr(node, "start_mark"):
        line = node.start_mark.line + 1
    return line
