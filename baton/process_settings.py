"""Settings of every Baton process, by one rule: CLI flags > env (BATON_<COMPONENT>_*) > the --config YAML
file > defaults. Each process declares a `ProcessSettings` model; its flags and error messages derive from it."""
from __future__ import annotations

import inspect
import logging
import pathlib
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import typer
import yaml
from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    YamlConfigSettingsSource,
)

S = TypeVar("S", bound="ProcessSettings")
_FLAG_TYPES = (str, int, float, bool, pathlib.Path)


class ConfigError(ValueError):
    """A setting is invalid; the message names the field and where its value came from."""


class YamlFile(YamlConfigSettingsSource):
    """The --config file: `field_name: value` lines. Unlike the library's source, a missing or malformed
    file is an error naming it, not silently no settings."""

    def __init__(self, settings_cls: type[BaseSettings], path: pathlib.Path | str | None) -> None:
        if path is not None and not pathlib.Path(path).is_file():
            raise ConfigError(f"{path}: config file not found")
        super().__init__(settings_cls, yaml_file=path)

    def _read_file(self, file_path: pathlib.Path) -> dict[str, Any]:
        try:
            loaded = super()._read_file(file_path)
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{file_path}: cannot read YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{file_path}: the top level must be a mapping of setting: value")
        if "config" in loaded:
            raise ConfigError(f"{file_path}: 'config' cannot be set inside the config file")
        return loaded


class ProcessSettings(BaseSettings):
    """Base of a process's settings; a subclass sets `env_prefix` and adds its fields."""

    model_config = SettingsConfigDict(extra="forbid")

    config: pathlib.Path | None = Field(None, description="YAML file of these settings (keys: the flag names "
                                                          "with underscores)")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="logging level: debug / info / warning / error")
    log_json: bool = Field(False, description="structured JSON logs")

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower_level(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @property
    def logging_level(self) -> int:
        return logging.getLevelName(self.log_level.upper())

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Earlier sources win; a field none of them sets keeps its default. Init kwargs are the flags.
        path = init_settings.init_kwargs.get("config") or env_settings().get("config")
        return init_settings, env_settings, YamlFile(settings_cls, path)

    @classmethod
    def load(cls: type[S], **flags: Any) -> S:
        """The settings from `flags` (None = flag not given), env, the config file and defaults.
        Raises ConfigError naming each bad field and where its value came from."""
        given = {k: v for k, v in flags.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc, given)) from None
        except SettingsError as exc:  # an env value of a nested field that is not JSON
            raise ConfigError(f"{_component(cls)}: {exc}") from None


def _component(cls: type[ProcessSettings]) -> str:
    return cls.model_config["env_prefix"].strip("_").lower().replace("_", " ")


def _describe(cls: type[ProcessSettings], exc: ValidationError, flags: dict[str, Any]) -> str:
    prefix = cls.model_config["env_prefix"]
    env = EnvSettingsSource(cls)()
    path = flags.get("config") or env.get("config")
    in_file = YamlFile(cls, path)() if path else {}
    lines = []
    for err in exc.errors():
        key = str(err["loc"][0]) if err["loc"] else ""
        flag = f"--{key.replace('_', '-')}"
        if key in flags:
            source = f"flag {flag}"
        elif key in env:
            source = f"env {prefix}{key.upper()}"
        elif key in in_file:
            source = str(path)
        elif err["type"] == "missing":
            source = f"not given: pass {flag}, env {prefix}{key.upper()} or '{key}:' in the --config file"
        else:
            source = "default"
        field = ".".join(str(p) for p in err["loc"])
        where = f"setting '{field}' ({source})" if field else "settings"
        given = f": {err['input']}" if err["type"].startswith("path_") else ""  # name the file that is not there
        lines.append(f"{_component(cls)} {where}: {err['msg']}{given}")
    return "\n".join(lines)


def settings_command(settings_cls: type[S], run: Callable[[S], None], summary: str, *,
                     fixed: dict[str, Any] | None = None,
                     aliases: dict[str, tuple[str, ...]] | None = None) -> Callable[..., None]:
    """A typer command with one flag per field (`--field-name`; booleans also `--no-field-name`) that builds
    the settings and hands them to `run`. `fixed` fields are set by the command itself and get no flag;
    `aliases` are extra flag names. A bad setting exits 2 with the message, never a traceback."""
    fixed, aliases = fixed or {}, aliases or {}
    own = [n for n in settings_cls.model_fields if n not in ProcessSettings.model_fields]
    params, unflagged = [], []
    for name in [*own, *ProcessSettings.model_fields]:
        if name in fixed:
            continue
        field = settings_cls.model_fields[name]
        kind = _flag_type(field.annotation)
        if kind is None:
            unflagged.append(name)
            continue
        dashed = name.replace("_", "-")
        decls = [f"--{dashed}/--no-{dashed}"] if kind is bool else [f"--{dashed}", *aliases.get(name, ())]
        option = typer.Option(None, *decls, help=_help(field), show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=kind | None))

    def command(**flags: Any) -> None:
        try:
            settings = settings_cls.load(**fixed, **flags)
        except ConfigError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        run(settings)

    prefix = settings_cls.model_config["env_prefix"]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = (
        f"{summary}\n\nEvery setting is a flag, an env var {prefix}<NAME> (e.g. {prefix}REDIS_URL) and a key of "
        f"the --config YAML file (e.g. redis_url); flags beat env, env beats the file, the file beats defaults."
        + (f" Only in env (JSON) or the file: {', '.join(unflagged)}." if unflagged else ""))
    return command


def _flag_type(annotation: Any) -> type | None:
    """The click type of a field's flag; None for fields a flag cannot spell (nested models)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            return None
        annotation = args[0]
    if typing.get_origin(annotation) is Literal or annotation is SecretStr:
        return str
    return annotation if annotation in _FLAG_TYPES else None


def _help(field: FieldInfo) -> str:
    text = field.description or ""
    if field.is_required():
        return f"{text} (required)"
    if field.default_factory is None and field.default is not None and field.default is not False:
        return f"{text} (default: {field.default})"
    return text
