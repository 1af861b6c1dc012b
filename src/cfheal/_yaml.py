"""Load a YAML file into a pydantic model, turning every failure into a ConfigError.

The messages name the file, the key path and what was expected, because an operator
fixing a configuration at night should not have to read a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from .errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """Convert "500ms", "10s", "5m", "1h" or a bare number of seconds to seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 10s, 500ms or 5m")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError("expected a duration such as 10s, 500ms or 5m")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A length of time in seconds, written in YAML as 10s, 500ms, 5m, 1h or a number."""


class StrictModel(BaseModel):
    """Base for configuration models: unknown keys are errors, and models are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def load_model(path: Path, model: type[ModelT], *, context: dict[str, Any] | None = None) -> ModelT:
    """Read ``path`` as YAML and validate it as ``model``."""
    document = _read_yaml(path)
    try:
        return model.model_validate(document, context=context)
    except ValidationError as error:
        raise ConfigError(_describe_validation_error(path, error)) from None


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot be read: {error}") from None

    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {_describe_yaml_error(error)}") from None

    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, found {type(document).__name__}")
    return document


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _describe_validation_error(path: Path, error: ValidationError) -> str:
    lines = [f"{path}: {error.error_count()} invalid setting(s):"]
    for item in error.errors():
        key = format_key_path(item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key; check its spelling and where it is nested"
        elif item["type"] != "missing" and not isinstance(item.get("input"), (dict, list)):
            # Whole sections are left out: the key path already says where to look.
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def format_key_path(location: tuple[Any, ...]) -> str:
    """Render a pydantic location such as ('hosts', 0, 'port') as hosts[0].port."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text
