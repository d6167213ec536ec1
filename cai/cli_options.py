"""Command-line options made from a settings model, so each setting lives in one place.

`settings_command(schema, run)` returns a typer command whose options are the pydantic model's
fields: the flag is the field's name (`batch_size` -> `--batch-size`), its help is the field's
description and default, booleans get `--name/--no-name` (or the field's `json_schema_extra["cli"]`),
list fields take comma-separated values (the flag may be repeated too), `Literal` fields list their choices, and a field that is itself
a settings model (a generator's `sampling`) contributes its own fields as options, one level deep. `--config FILE` reads
a YAML file of the same settings; flags given on the command line override it. What is wrong is
reported by `load_settings` with the file (or "flags") and the field named.

`flags_for(settings)` goes the other way, by the same naming rule (`_options`): the flags that command
parses back into equal settings, for a job that starts a child process (a judge) on them.
"""

from __future__ import annotations

import copy
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from cai.errors import CaiError


def settings_command(schema: type[BaseModel], run: Callable[[BaseModel], None], *, fixed: dict[str, Any] | None = None,
                     doc: str = "", on_error: Callable[[str], None] | None = None) -> Callable[..., None]:
    """A typer callback taking --config and one option per field of `schema` (but `fixed` ones), calling `run(config)`.

    A `CaiError` (bad settings, or one the run raises) goes to `on_error(message)`, by default printed as
    one line on stderr with exit code 1: what the user can fix needs no traceback.
    """
    from cai.settings_file import load_settings

    fixed = fixed or {}
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", help="YAML file of these settings (all of them, the ones without a flag "
                                     "too); flags given here override it.")])]
    lists: set[str] = set()
    nested: dict[str, str] = {}  # option name -> the nested model field it belongs to
    for option in _options(schema):
        if option.name in fixed:
            continue
        if option.parent is not None:
            nested[option.name] = option.parent
        if option.is_list:
            lists.add(option.name)
        field = option.field
        help_text = field.description or ""
        if option.choices:
            help_text += f" One of: {', '.join(map(str, option.choices))}."
        if field.is_required():
            help_text += " (required)"
        elif option.envvar is None:  # a secret's default is not shown
            help_text += f" (default: {_shown(field.get_default(call_default_factory=True))})"
        decl = option.flag if option.off_flag is None else f"{option.flag}/{option.off_flag}"
        envvar = option.envvar
        typer_option = typer.Option(decl, help=help_text, show_default=False, envvar=envvar, show_envvar=bool(envvar))
        # A list flag may be repeated, each comma-separated.
        shape = Optional[list[option.kind]] if option.is_list else Optional[option.kind]
        params.append(inspect.Parameter(option.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Annotated[shape, typer_option]))

    def command(**given: Any) -> None:
        config = given.pop("config")
        overrides: dict[str, Any] = {}
        for k, v in given.items():
            if v is None or (k in lists and not v):
                continue
            if k in lists:
                parts = [p for given_once in v for p in given_once.split(",")]
                v = parts if len(parts) > 1 or _takes_list_only(schema, k, nested) else parts[0]
            if k in nested:  # merged into the nested model's values from --config, if any (load_settings)
                overrides.setdefault(nested[k], {})[k] = v
            else:
                overrides[k] = v
        try:
            run(load_settings(config, {**overrides, **fixed}, schema=schema))
        except CaiError as e:
            (on_error or _print_error)(str(e))

    command.__signature__ = inspect.Signature(params)  # typer reads the options from here
    command.__doc__ = doc
    return command


def flags_for(settings: BaseModel) -> list[str]:
    """`settings` as the flags of `settings_command(type(settings), ...)`, which parses them back into equal settings.

    Each option is given its value, in the order of the model's fields (a nested model's fields in its place): a list
    comma-separated, a boolean as its on or off switch. Left out: fields set to None, empty lists, fields with no flag
    (a mapping) and secrets, which the command reads from their environment variable and which must not show in `ps`.
    """
    flags: list[str] = []
    for option in _options(type(settings)):
        value = getattr(getattr(settings, option.parent) if option.parent else settings, option.name)
        if value is None or value == [] or option.envvar is not None:
            continue
        if option.kind is bool:
            flags.append(option.flag if value else option.off_flag)
        else:
            flags += [option.flag, ",".join(map(str, value)) if option.is_list else str(value)]
    return flags


@dataclass(frozen=True)
class _Option:
    """One command-line option of a settings model: the field it sets and how it is spelt."""

    name: str
    field: FieldInfo
    parent: str | None  # the field of the nested settings model it belongs to, if any
    kind: type
    choices: tuple
    is_list: bool
    flag: str  # --batch-size; a boolean's on switch
    off_flag: str | None  # a boolean's off switch (--no-name, or the second half of its json_schema_extra["cli"])
    envvar: str | None


def _options(schema: type[BaseModel]) -> list[_Option]:
    """The options `settings_command` makes for `schema`, required fields first; a nested model's fields flattened."""
    fields: list[tuple[str, FieldInfo, str | None]] = []
    for name, field in sorted(schema.model_fields.items(), key=lambda kv: not kv[1].is_required()):  # what must be given first
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            default = field.get_default(call_default_factory=True)
            for sub_name, sub_field in field.annotation.model_fields.items():
                if sub_name in schema.model_fields:
                    raise TypeError(f"{schema.__name__}.{name}.{sub_name} would share its option with {schema.__name__}.{sub_name}")
                shown = copy.copy(sub_field)
                shown.default = getattr(default, sub_name)  # the parent's default (prefs samples at temperature 1.0)
                fields.append((sub_name, shown, name))
        else:
            fields.append((name, field, None))
    options = []
    for name, field, parent in fields:
        kind, choices, is_list = _cli_type(field.annotation)
        if kind is None:
            continue
        extra = field.json_schema_extra or {}
        flag, off_flag = "--" + name.replace("_", "-"), None
        if kind is bool:
            flag, off_flag = extra.get("cli", f"{flag}/--no-{name.replace('_', '-')}").split("/")
        options.append(_Option(name, field, parent, kind, choices, is_list, flag, off_flag, extra.get("envvar")))
    return options


def _takes_list_only(schema: type[BaseModel], name: str, nested: dict[str, str]) -> bool:
    """Whether the field `name` (of `schema`, or of its nested model) accepts a list but no single string."""
    model = schema.model_fields[nested[name]].annotation if name in nested else schema
    annotation = model.model_fields[name].annotation
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return str not in args


def _print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _cli_type(annotation: Any) -> tuple[type | None, tuple, bool]:
    """(the click type or None for no flag, the Literal choices, whether a list is accepted) of a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] if _is_union(annotation) else [annotation]
    is_list = any(typing.get_origin(a) is list for a in args)
    if is_list:
        return str, (), True
    (single,) = args
    if typing.get_origin(single) is Literal:
        return str, typing.get_args(single), False
    if single in (bool, int, float, str):
        return single, (), False
    if single is Path:
        return str, (), False
    if single is SecretStr:  # given as text; pydantic keeps it out of reprs and logs
        return str, (), False
    if typing.get_origin(single) is dict:
        return None, (), False  # a mapping (e.g. eval's thresholds) is given in --config only
    raise TypeError(f"no command-line form for settings of type {annotation!r}")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)
