"""Python functions as tools a model can call: load them, describe them as JSON schemas, call them safely.

Interface (used by `acornlm chat --tools` and by agentic RL rollouts):

    from acornlm.infer.tools import load_tool_functions, function_schema, call_tool

    functions = load_tool_functions("my_tools.py")        # {"get_weather": <function>, ...}
    tools = [function_schema(fn) for fn in functions.values()]
    # ... the model replies with a call {"name": "get_weather", "arguments": {"city": "Paris"}} ...
    result = call_tool(functions["get_weather"], {"city": "Paris"}, timeout_s=10)
    result.text        # what goes into the `tool` message: the return value, or the error text
    result.error       # None when the call returned; else why not (raised, bad arguments, timed out)
    result.timed_out   # the function did not return in time

The schema comes from the signature alone, so writing a tool is writing a typed function:

    def get_weather(city: str, unit: Literal["C", "F"] = "C") -> dict:
        \"\"\"Today's weather in a city.\"\"\"

becomes {"type": "function", "function": {"name": "get_weather", "description": "Today's weather in a
city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type":
"string", "enum": ["C", "F"], "default": "C"}}, "required": ["city"], "additionalProperties": false}}}.

Why every failure is a result, not an exception: a model's call is untrusted input and a tool is
ordinary code, so both go wrong routinely. The error text goes back to the model as the tool's
response (it may correct itself) and the chat or the rollout goes on.

Timeouts: the function runs in a daemon thread; when it has not returned after `timeout_s` the
caller gets a timed-out result at once and the thread is abandoned. Python cannot stop a thread, so
an abandoned call keeps running (and holding what it holds) in the background until it returns,
and its result is dropped; a function that never returns keeps its thread until the process
exits (being a daemon, it does not keep the process alive). Tools that may hang for good or burn
CPU should be run in a subprocess by the tool itself.
"""

from __future__ import annotations

import collections.abc
import enum
import hashlib
import importlib.util
import inspect
import json
import re
import sys
import threading
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from acornlm.errors import ConfigError

SIMPLE_TYPES: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean",
                                type(None): "null", dict: "object", list: "array", tuple: "array",
                                set: "array", frozenset: "array"}
ARRAY_ORIGINS = (list, set, frozenset, tuple, collections.abc.Sequence, collections.abc.MutableSequence,
                 collections.abc.Iterable, collections.abc.Collection, collections.abc.Set)
OBJECT_ORIGINS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)
ARGS_HEADER = re.compile(r"^\s*(Args|Arguments|Parameters)\s*:\s*$")
ARG_LINE = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one tool call.

    `text` is always what the `tool` message should hold: the return value (a string as it is,
    anything else JSON-encoded) or, when the call failed, the error text ("error: ...").
    """

    text: str
    error: str | None = None
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


# --------------------------------------------------------------------------- loading


def load_tool_functions(path: str | Path) -> dict[str, Callable[..., Any]]:
    """The public top-level functions defined in the Python file `path`, by name, in file order.

    Public: the name does not start with "_"; when the file defines `__all__`, only the functions
    it names. Functions the file imports from elsewhere (`from os import getcwd`) are not its own
    and are left out. Loading runs the file, as `python FILE` would: only load files you trust.
    Every function's schema is built here, so a hint that cannot be read fails now, not mid-chat.

    Raises ConfigError when the file is missing, fails to load or defines no public function.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tools file {path}: no such file")
    if path.suffix != ".py":
        raise ConfigError(f"tools file {path}: expected a Python file (.py) defining the tool functions")
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"acornlm_tools_{re.sub(r'[^0-9a-zA-Z_]', '_', path.stem)}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"tools file {path}: Python cannot load it as a module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and get_type_hints look the module up by name
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's code: any failure is a config problem
        sys.modules.pop(module_name, None)
        raise ConfigError(f"tools file {path}: loading it failed: {type(exc).__name__}: {exc}") from exc
    exported = getattr(module, "__all__", None)
    functions = {
        name: value for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module_name and not name.startswith("_")
        and (exported is None or name in exported)
    }
    if not functions:
        raise ConfigError(f"tools file {path}: it defines no public function (a top-level `def name(...)` "
                          "whose name does not start with '_')")
    for function in functions.values():
        function_schema(function)
    return functions


# --------------------------------------------------------------------------- schemas


def function_schema(fn: Callable[..., Any]) -> dict[str, Any]:
    """`fn` as an OpenAI tool: {"type": "function", "function": {"name", "description", "parameters"}}.

    The description is the docstring's first line; a parameter's description comes from a
    Google-style "Args:" section when there is one. Types come from the hints: str, int, float,
    bool, None, list[X] / tuple / set (array of X), dict (object), Optional[X] and X | None (X or
    null), unions of those, Literal[...] and Enum classes (enum), Annotated[X, ...] (X); anything
    else, or no hint, allows any value. Parameters without a default are required; defaults that
    JSON can hold are listed. Without **kwargs no other argument is allowed
    (additionalProperties: false), so a misspelled argument is refused before the call.

    Raises ConfigError when the hints cannot be resolved (a name the file never defines).
    """
    name = getattr(fn, "__name__", None)
    if not isinstance(name, str) or not callable(fn):
        raise ConfigError(f"a tool must be a named function, got {fn!r:.80}")
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)
    except (NameError, TypeError, ValueError, AttributeError, SyntaxError) as exc:
        raise ConfigError(f"tool {name}: cannot read its signature or type hints ({type(exc).__name__}: {exc})") \
            from exc
    doc = inspect.getdoc(fn) or ""
    argument_docs = docstring_arguments(doc)
    properties: dict[str, Any] = {}
    required: list[str] = []
    open_ended = False
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            continue
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            open_ended = True
            continue
        schema = type_schema(hints.get(parameter.name, inspect.Parameter.empty))
        if parameter.name in argument_docs:
            schema["description"] = argument_docs[parameter.name]
        if parameter.default is inspect.Parameter.empty:
            required.append(parameter.name)
        elif json_value(parameter.default):
            schema["default"] = parameter.default.value if isinstance(parameter.default, enum.Enum) \
                else parameter.default
        properties[parameter.name] = schema
    parameters: dict[str, Any] = {"type": "object", "properties": properties, "required": required}
    if not open_ended:
        parameters["additionalProperties"] = False
    function: dict[str, Any] = {"name": name, "description": doc.strip().split("\n", 1)[0].strip() if doc else "",
                                "parameters": parameters}
    return {"type": "function", "function": function}


def docstring_arguments(doc: str) -> dict[str, str]:
    """{parameter: first line of its description} from a Google-style "Args:" section."""
    found: dict[str, str] = {}
    lines = doc.splitlines()
    for start, line in enumerate(lines):
        if not ARGS_HEADER.match(line):
            continue
        indent = None
        for entry in lines[start + 1:]:
            if not entry.strip():
                continue
            depth = len(entry) - len(entry.lstrip())
            if indent is None:
                indent = depth
            if depth < indent:
                break
            match = ARG_LINE.match(entry)
            if depth == indent and match:
                found[match.group(1)] = match.group(2).strip()
        break
    return found


def json_value(value: Any) -> bool:
    """Whether `value` can be written in a JSON schema (as a default)."""
    if isinstance(value, enum.Enum):
        value = value.value
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def type_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of one type hint (see `function_schema` for what is understood); {} = any value."""
    if hint is inspect.Parameter.empty or hint is Any or hint is object:
        return {}
    if hint is None:
        return {"type": "null"}
    if isinstance(hint, type) and hint in SIMPLE_TYPES:
        return {"type": SIMPLE_TYPES[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return enum_schema([member.value for member in hint])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return type_schema(args[0])
    if origin is typing.Literal:
        return enum_schema(list(args))
    if origin is typing.Union or origin is types.UnionType:
        return union_schema([type_schema(arg) for arg in args])
    if origin in ARRAY_ORIGINS:
        schema: dict[str, Any] = {"type": "array"}
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = args[:1]
        if len(args) == 1 or (args and all(arg == args[0] for arg in args)):
            items = type_schema(args[0])
            if items:
                schema["items"] = items
        return schema
    if origin in OBJECT_ORIGINS:
        return {"type": "object"}
    return {}


def enum_schema(values: list[Any]) -> dict[str, Any]:
    """{"type": ..., "enum": values}, the type(s) taken from the values."""
    kinds: list[str] = []
    for value in values:
        kind = SIMPLE_TYPES.get(type(value))
        if kind and kind not in kinds:
            kinds.append(kind)
    schema: dict[str, Any] = {"enum": values}
    if kinds:
        schema = {"type": kinds[0] if len(kinds) == 1 else kinds, **schema}
    return schema


def union_schema(members: list[dict[str, Any]]) -> dict[str, Any]:
    """One schema for Union[...] members: their types as a list, their enums merged. A member that
    allows anything makes the union allow anything (the checker knows no anyOf)."""
    if any(not member.get("type") for member in members):
        return {}
    kinds: list[str] = []
    for member in members:
        for kind in member["type"] if isinstance(member["type"], list) else [member["type"]]:
            if kind not in kinds:
                kinds.append(kind)
    schema: dict[str, Any] = {"type": kinds[0] if len(kinds) == 1 else kinds}
    constrained = [member for member in members if member["type"] != "null"]
    if constrained and all("enum" in member for member in constrained):
        values = [value for member in constrained for value in member["enum"]]
        schema["enum"] = values + [None] if len(constrained) < len(members) else values
    arrays = [member for member in members if member["type"] == "array" and "items" in member]
    if len(arrays) == 1:
        schema["items"] = arrays[0]["items"]
    return schema


# --------------------------------------------------------------------------- calling


def call_tool(fn: Callable[..., Any], arguments: Mapping[str, Any] | str, timeout_s: float) -> ToolResult:
    """Call `fn` with the model's `arguments` (a dict, or its JSON text), giving up after `timeout_s` seconds.

    Never raises for anything the call does: arguments that are not a JSON object or do not fit
    the signature, an exception in the function and a timeout all come back as a result whose
    `text` says what went wrong (see the module docstring on what happens to a call that times
    out). A str return value is the text as it is; anything else is JSON-encoded (values JSON cannot
    hold are written with str()). Arguments for an Enum-typed parameter are converted to the Enum.

    Raises ConfigError only for a `timeout_s` that is not a positive number (the caller's mistake).
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ConfigError(f"a tool timeout must be a positive number of seconds, got {timeout_s!r}")
    name = getattr(fn, "__name__", "tool")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError) as exc:
            return failure(f"the arguments of {name} are not valid JSON ({exc})")
    if not isinstance(arguments, Mapping) or not all(isinstance(key, str) for key in arguments):
        return failure(f"the arguments of {name} must be a JSON object, got {type(arguments).__name__}")
    try:
        args, kwargs = bind_arguments(fn, arguments)
    except (TypeError, ValueError) as exc:
        return failure(f"the arguments do not fit {name}{signature_text(fn)}: {exc}")
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - SystemExit and friends included: the caller decides
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"acornlm-tool-{name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():  # abandoned: see the module docstring
        return failure(f"{name} did not return within {timeout_s:g} s", timed_out=True)
    if "error" in outcome:
        exc = outcome["error"]
        return failure(f"{name} raised {type(exc).__name__}: {exc}")
    return ToolResult(text=result_text(outcome.get("value")))


def failure(message: str, timed_out: bool = False) -> ToolResult:
    return ToolResult(text=f"error: {message}", error=message, timed_out=timed_out)


def result_text(value: Any) -> str:
    """A return value as the tool message's text: a str as it is, anything else as JSON."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):  # e.g. a list that contains itself
        return str(value)


def signature_text(fn: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"


def bind_arguments(fn: Callable[..., Any], arguments: Mapping[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """(positional, keyword) arguments for calling `fn` with the named `arguments`.

    Positional-only parameters are passed by position, Enum-typed values become their Enum, and
    `Signature.bind` checks the rest: TypeError for a missing, unknown or surplus argument.
    """
    signature = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # noqa: BLE001 - without hints nothing is converted
        hints = {}
    remaining = dict(arguments)
    args: list[Any] = []
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL and parameter.name in remaining:
            raise TypeError(f"*{parameter.name} cannot be passed by name")
        hint = hints.get(parameter.name)
        if parameter.name in remaining and isinstance(hint, type) and issubclass(hint, enum.Enum):
            try:
                remaining[parameter.name] = hint(remaining[parameter.name])
            except ValueError as exc:
                raise ValueError(f"{parameter.name}: {exc}") from exc
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
            if parameter.name in remaining:
                args.append(remaining.pop(parameter.name))
            elif parameter.default is inspect.Parameter.empty:
                raise TypeError(f"missing the required argument {parameter.name!r}")
            else:
                args.append(parameter.default)  # so that a later positional-only argument keeps its place
    signature.bind(*args, **remaining)
    return args, remaining
