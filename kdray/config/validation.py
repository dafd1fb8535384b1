"""How a config is validated: strict pydantic models whose errors name the dotted field, the file being read (its
folder is searched for plugins and relative paths), and paths made absolute for workers that run elsewhere."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kdray.errors import ConfigError


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _valid_keys(root: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The field names of the model that sits at ``loc`` (best effort, for 'unknown field' errors)."""
    cls: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(cls, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if cls is None:
            return None
    return list(getattr(cls, "model_fields", {}) or []) or None


def pydantic_errors(e: ValidationError, root: type[BaseModel], prefix: tuple[Any, ...] = ()) -> list[tuple[str, str]]:
    out = []
    for err in e.errors():
        loc = prefix + tuple(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            keys = _valid_keys(root, tuple(err["loc"])[:-1])
            msg = "unknown field" + (f" (valid fields here: {', '.join(keys)})" if keys else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif "input" in err and err["type"] not in ("value_error", "assertion_error"):
            shown = repr(err["input"])
            msg += f" (got {shown[:80]}{'...' if len(shown) > 80 else ''})"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append((_loc(loc), msg))
    return out


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


_reading: list[Path] = []  # the config file being validated: its folder is searched for plugin modules


def import_config_plugins(data: Any) -> Any:
    """Import a config's ``plugins`` (and installed entry points) before any field names a registry entry:
    a ``model_validator(mode="before")`` of every top-level config, so a Ray worker that validates a trial's
    config imports them too. Errors name the field (``plugins.1``)."""
    from kdray import plugins

    try:
        plugins.load_entry_points()
        if isinstance(data, dict) and data.get("plugins") is not None:
            mods = data["plugins"]
            if isinstance(mods, str):
                mods = [mods]
            if not isinstance(mods, list):
                raise plugins.PluginError("plugins", f"expected a list of Python module names, got {mods!r}")
            search = [p.parent for p in _reading[-1:]] + [Path.cwd()]
            plugins.import_plugins(mods, where="plugins", search=search)
            data = {**data, "plugins": mods}
    except plugins.PluginError as e:
        raise ConfigError([(e.field, e.reason)]) from None
    return data


def local_path(value: Any) -> Any:
    """A relative path that exists next to the config being read (else in the working directory) made
    absolute: Ray workers run in other folders. Anything else (a hub id, a URI) is returned unchanged."""
    if isinstance(value, list):
        return [local_path(v) for v in value]
    if isinstance(value, dict):
        return {k: local_path(v) for k, v in value.items()}
    if not isinstance(value, str) or not value or "://" in value or Path(value).is_absolute():
        return value
    for folder in [p.parent for p in _reading[-1:]] + [Path.cwd()]:
        candidate = folder / value
        if candidate.exists():
            return str(candidate.resolve())
    return value


def absolute_dir(value: Any) -> Any:
    """A folder given relative (``data``, ``~/data``) made absolute: next to the config being read when it exists
    there, else in the working directory (it may be created later, a download's target). Tune runs each trial in
    a folder of its own: a relative path would point elsewhere in every trial."""
    if not isinstance(value, str) or not value or "://" in value:
        return value
    value = str(Path(value).expanduser())
    if Path(value).is_absolute():
        return value
    found = local_path(value)
    return found if found != value else str((Path.cwd() / value).resolve())


HF_PREFIXES = ("hf/", "hf-lm/")  # model names whose rest is a hub id or a local folder


def absolute_hf_name(name: Any) -> Any:
    """``hf/./my-bert`` -> ``hf//abs/path/my-bert`` (also ``hf-lm/``): workers build the model from the same folder."""
    for prefix in HF_PREFIXES:
        if isinstance(name, str) and name.startswith(prefix):
            return prefix + local_path(name[len(prefix):])
    return name


PATH_OPTIONS = ("path", "test_path", "root", "tokenizer", "data_files")  # data-set options that name files


PLUGINS_FIELD = Field(default_factory=list, description="Python modules to import first: they register your own "
                      "models, data sets and knowledge types (also --plugin and the kdray.plugins entry points)")


def validate(cls: type[BaseModel], data: dict[str, Any], file: str | Path | None = None) -> Any:
    if file is not None and Path(str(file)).is_file():
        _reading.append(Path(str(file)).resolve())
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(pydantic_errors(e, cls), file=file) from None
    except ConfigError as e:
        raise (e.with_file(file) if file else e) from None
    finally:
        if file is not None and Path(str(file)).is_file():
            _reading.pop()


def is_finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
