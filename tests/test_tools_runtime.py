"""Python functions as tools (acornlm/infer/tools.py): loading a file, schemas from hints, safe calls."""

from __future__ import annotations

import enum
import json
import textwrap
import threading
import time
from typing import Annotated, Any, Literal, Optional

import pytest

from acornlm.data.tools import schema_problem
from acornlm.errors import ConfigError
from acornlm.infer.tools import ToolResult, call_tool, function_schema, load_tool_functions


class Unit(enum.Enum):
    C = "C"
    F = "F"


def weather(city: str, days: int = 1, unit: Literal["C", "F"] = "C", note: Optional[str] = None,  # noqa: UP045
            tags: list[str] | None = None, scale: float = 1.0, verbose: bool = False) -> dict:
    """Today's weather in a city.

    Longer text that is not the description.

    Args:
        city: The city, e.g. "Paris".
        days (int): How many days ahead.
            A second line of the description.
        unit: Celsius or Fahrenheit.
    """
    return {"city": city, "days": days}


def schema_of(fn) -> dict[str, Any]:
    return function_schema(fn)["function"]


def test_schema_from_hints_defaults_docstring_and_literal():
    schema = function_schema(weather)
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "weather" and function["description"] == "Today's weather in a city."
    parameters = function["parameters"]
    assert parameters["required"] == ["city"] and parameters["additionalProperties"] is False
    properties = parameters["properties"]
    assert properties["city"] == {"type": "string", "description": 'The city, e.g. "Paris".'}
    assert properties["days"] == {"type": "integer", "description": "How many days ahead.", "default": 1}
    assert properties["unit"] == {"type": "string", "enum": ["C", "F"], "description": "Celsius or Fahrenheit.",
                                  "default": "C"}
    assert properties["note"] == {"type": ["string", "null"], "default": None}
    assert properties["tags"] == {"type": ["array", "null"], "items": {"type": "string"}, "default": None}
    assert properties["scale"] == {"type": "number", "default": 1.0}
    assert properties["verbose"] == {"type": "boolean", "default": False}
    json.dumps(schema)  # the whole schema is JSON
    # The schema checks the model's arguments as the server and the chat do.
    assert schema_problem({"city": "Paris", "unit": "C", "tags": ["a"]}, parameters) is None
    assert "must be one of" in schema_problem({"city": "Paris", "unit": "K"}, parameters)
    assert "lacks the required 'city'" in schema_problem({}, parameters)
    assert "does not allow" in schema_problem({"city": "x", "town": "y"}, parameters)


def test_schema_of_other_hints():
    def many(a, b: Any, c: dict[str, int], d: tuple[int, ...], e: Unit = Unit.C, f: int | str = 0,
             g: Annotated[int, "meta"] = 2, h: Literal[1, 2] | None = None, *args, **kwargs) -> None:
        pass

    function = schema_of(many)
    properties = function["parameters"]["properties"]
    assert function["description"] == ""
    assert properties["a"] == {} and properties["b"] == {}
    assert properties["c"] == {"type": "object"}
    assert properties["d"] == {"type": "array", "items": {"type": "integer"}}
    assert properties["e"] == {"type": "string", "enum": ["C", "F"], "default": "C"}
    assert properties["f"] == {"type": ["integer", "string"], "default": 0}
    assert properties["g"] == {"type": "integer", "default": 2}
    assert properties["h"] == {"type": ["integer", "null"], "enum": [1, 2, None], "default": None}
    assert "args" not in properties and "kwargs" not in properties
    assert "additionalProperties" not in function["parameters"]  # **kwargs takes any other name


def test_unresolvable_hints_are_a_config_error():
    def broken(x: NoSuchType) -> str:  # noqa: F821
        return ""

    with pytest.raises(ConfigError, match="broken: cannot read its signature or type hints"):
        function_schema(broken)


def test_call_returns_text_or_json():
    assert call_tool(weather, {"city": "北京"}, timeout_s=5) == ToolResult(text='{"city": "北京", "days": 1}')
    assert call_tool(weather, '{"city": "Oslo", "days": 2}', 5).text == '{"city": "Oslo", "days": 2}'
    assert call_tool(lambda: "plain text", {}, 5).text == "plain text"
    assert call_tool(lambda: None, {}, 5).text == "null"
    assert call_tool(lambda: {"odd": {1}}, {}, 5).text == '{"odd": "{1}"}'  # what JSON cannot hold: str()
    looped: list = []
    looped.append(looped)
    assert call_tool(lambda: looped, {}, 5).text == "[[...]]"


def test_enum_arguments_are_converted():
    def temperature(unit: Unit) -> str:
        return unit.name

    assert call_tool(temperature, {"unit": "F"}, 5).text == "F"
    assert "unit" in call_tool(temperature, {"unit": "K"}, 5).error


def test_a_function_that_raises_gives_its_error_as_text():
    def divide(a: int, b: int) -> float:
        return a / b

    result = call_tool(divide, {"a": 1, "b": 0}, timeout_s=5)
    assert not result.ok and not result.timed_out
    assert result.error == "divide raised ZeroDivisionError: division by zero"
    assert result.text == "error: " + result.error

    def leave() -> None:
        raise SystemExit(3)

    assert "SystemExit" in call_tool(leave, {}, 5).error  # not the caller's exit


def test_a_function_that_hangs_is_abandoned_after_the_timeout():
    release = threading.Event()

    def hang() -> str:
        release.wait(30)
        return "late"

    start = time.monotonic()
    result = call_tool(hang, {}, timeout_s=0.2)
    elapsed = time.monotonic() - start
    release.set()  # let the abandoned thread end
    assert result.timed_out and not result.ok
    assert result.error == "hang did not return within 0.2 s" and result.text.startswith("error: ")
    assert 0.19 <= elapsed < 2
    with pytest.raises(ConfigError, match="positive number"):
        call_tool(hang, {}, timeout_s=0)


@pytest.mark.parametrize("arguments, problem", [
    ({}, "missing a required argument: 'city'"),
    ({"city": "x", "town": "y"}, "unexpected keyword argument 'town'"),
    ([1, 2], "must be a JSON object, got list"),
    ("{not json", "not valid JSON"),
    ('"a string"', "must be a JSON object, got str"),
])
def test_arguments_that_do_not_fit_give_an_error_result(arguments, problem):
    result = call_tool(weather, arguments, timeout_s=5)
    assert not result.ok and problem in result.error, result.error
    assert result.text == "error: " + result.error


def test_positional_only_parameters_are_passed_by_position():
    def power(base: int, exponent: int = 2, /, scale: int = 1) -> int:
        return scale * base ** exponent

    assert call_tool(power, {"base": 3}, 5).text == "9"
    assert call_tool(power, {"base": 2, "exponent": 3, "scale": 2}, 5).text == "16"
    assert "missing the required argument 'base'" in call_tool(power, {}, 5).error


def test_load_tool_functions_takes_the_files_own_public_functions(tmp_path):
    path = tmp_path / "my_tools.py"
    path.write_text(textwrap.dedent('''
        from __future__ import annotations

        from dataclasses import dataclass
        from os import getcwd  # imported, not defined here: not a tool

        @dataclass
        class Point:
            x: int

        def add(a: int, b: int = 0) -> int:
            """Add two integers."""
            return a + b

        def shout(text: str) -> str:
            """Upper-case a text."""
            return text.upper()

        def _helper() -> None:
            pass

        VALUE = 3
    '''), encoding="utf-8")
    functions = load_tool_functions(path)
    assert list(functions) == ["add", "shout"]
    assert function_schema(functions["add"])["function"]["parameters"]["properties"]["a"] == {"type": "integer"}
    assert call_tool(functions["add"], {"a": 2, "b": 3}, 5).text == "5"

    exported = tmp_path / "exported.py"
    exported.write_text("__all__ = ['b']\ndef a():\n    pass\ndef b():\n    pass\n", encoding="utf-8")
    assert list(load_tool_functions(exported)) == ["b"]


@pytest.mark.parametrize("source, message", [
    (None, "no such file"),
    ("x = 1\n", "defines no public function"),
    ("def f(:\n", "loading it failed: SyntaxError"),
    ("raise RuntimeError('boom')\n", "loading it failed: RuntimeError: boom"),
    ("import sys\nsys.exit(1)\n", "loading it failed: SystemExit"),
    ("def f(x: 'Missing'):\n    pass\n", "cannot read its signature or type hints"),
])
def test_load_tool_functions_errors_are_config_errors(tmp_path, source, message):
    path = tmp_path / "tools.py"
    if source is not None:
        path.write_text(source, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        load_tool_functions(path)
    not_python = tmp_path / "tools.txt"
    not_python.write_text("def f(): pass\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="expected a Python file"):
        load_tool_functions(not_python)
