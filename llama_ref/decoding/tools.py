"""Tool calls (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`) for models that have no
tool tokens: the answer is forced by a grammar into one JSON form, stated to the model in
a system message (docs/spec/api.md, "Tools"):

    {"tool_calls": [{"name": "<function>", "arguments": {<its parameters>}}, ...]}

- tool_choice "required": that form, one or more calls ("parallel_tool_calls": false, exactly one);
  a named function: that form with that one function, one call; "auto": either that form or
  free text that does not start with "{", in one grammar (llguidance's Lark with an embedded
  %json schema), so the model chooses by its first token and nothing is generated twice;
  "none": no grammar, and the tools are left out of the prompt.
- The arguments are the model's own text of the `arguments` object: they parse and
  validate against the function's `parameters` when the answer finishes, because the
  grammar allows nothing else and the token budget closes them in time (json_schema.py).
- CallStream splits the growing text into content (the free-text branch) or call deltas:
  a call's id and name once its name is written, then fragments of its arguments.
"""
import json
import re
import uuid
from dataclasses import dataclass, field
from functools import cached_property

from .json_schema import SEPARATORS, Completer, SchemaError, check_schema

CHOICES = ("none", "auto", "required")
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")   # OpenAI's rule for a function name


class ToolError(SchemaError):
    """tools or tool_choice break a rule; `param` names the field."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict            # a JSON Schema of type object

    def openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str              # the arguments object as JSON text, as the model wrote it


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call: the first carries id and name (arguments ""), later ones
    a fragment of the arguments."""
    index: int
    id: str | None
    name: str | None
    arguments: str


def parse_tools(tools, tool_choice=None, parallel_tool_calls: bool = True) -> "ToolUse | None":
    """ToolUse from OpenAI-shaped `tools` ([{"type": "function", "function": {...}}]) and
    `tool_choice`; None when there is nothing to call (no tools, or tool_choice "none")."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise ToolError("tool_choice: needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise ToolError("tools: must be a list of functions", "tools")
    parsed = [parse_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools)]
    names = [tool.name for tool in parsed]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ToolError(f"tools[{i}].function.name: {name!r} is given twice", f"tools[{i}].function.name")
    choice = "auto" if tool_choice is None else tool_choice
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise ToolError(f"tool_choice: {{'type': 'function', 'function': {{'name': {name!r}}}}} names no function "
                            f"in tools ({', '.join(names)})", "tool_choice")
        parsed, choice = [parsed[names.index(name)]], "named"
    elif choice not in CHOICES:
        raise ToolError(f"tool_choice: one of {', '.join(CHOICES)} or {{'type': 'function', 'function': "
                        f"{{'name': ...}}}}, got {choice!r}", "tool_choice")
    if choice == "none":
        return None
    return ToolUse(tuple(parsed), choice, bool(parallel_tool_calls) and choice != "named")


def parse_tool(tool, where: str) -> Tool:
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ToolError(f"{where}: must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}",
                        where)
    function = tool["function"]
    name = function.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ToolError(f"{where}.function.name: 1 to 64 letters, digits, '_' or '-', got {name!r}",
                        f"{where}.function.name")
    parameters = function.get("parameters", {"type": "object", "properties": {}})
    check_schema(parameters, f"{where}.function.parameters")
    if not isinstance(parameters, dict) or parameters.get("type") != "object":
        raise ToolError(f"{where}.function.parameters.type: must be 'object' (the arguments are an object)",
                        f"{where}.function.parameters.type")
    description = function.get("description", "")
    if not isinstance(description, str):
        raise ToolError(f"{where}.function.description: must be a string", f"{where}.function.description")
    return Tool(name, description, parameters)


@dataclass(frozen=True)
class ToolUse:
    tools: tuple[Tool, ...]
    choice: str                 # "auto" | "required" | "named"
    parallel: bool              # more than one call allowed

    def calls_schema(self) -> dict:
        """The JSON Schema of the calls form."""
        call = [{"type": "object", "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
                 "required": ["name", "arguments"], "additionalProperties": False} for tool in self.tools]
        calls = {"type": "array", "items": call[0] if len(call) == 1 else {"anyOf": call}, "minItems": 1}
        if not self.parallel:
            calls["maxItems"] = 1
        return {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"],
                "additionalProperties": False}

    def grammar(self) -> str:
        """llguidance's Lark: the calls form, or (auto) free text whose first character that is
        not a space is not "{"."""
        calls = "calls: %json " + json.dumps({**self.calls_schema(), "x-guidance": SEPARATORS})
        if self.choice != "auto":
            return "start: calls\n" + calls
        return "start: TEXT | calls\nTEXT: /\\s*[^{\\s][\\s\\S]*/\n" + calls

    def closing(self, text: str) -> str | None:
        """The shortest completion of the answer so far: the calls form's; None (no budget rule)
        in auto until the answer starts the calls form, and for free text."""
        if self.choice == "auto" and not text.lstrip().startswith("{"):
            return None
        return self.completer.complete(text)

    @cached_property
    def completer(self) -> Completer:
        """The calls form's shortest completion, built once (closing runs at every token)."""
        return Completer(self.calls_schema())

    def system_prompt(self) -> str:
        """The block that tells the model about the tools and the form the grammar enforces."""
        functions = "\n".join(json.dumps({"name": t.name, "description": t.description, "parameters": t.parameters},
                                         ensure_ascii=False) for t in self.tools)
        form = '{"tool_calls": [{"name": "<function name>", "arguments": {<the arguments>}}]}'
        if self.choice == "auto":
            when = ("To call functions, answer with only this JSON, nothing before or after it:\n" + form +
                    "\nOtherwise answer in plain text.")
        elif self.choice == "named":
            when = f"Call the function {self.tools[0].name} now: answer with only this JSON:\n" + form
        else:
            when = "Call one or more of these functions now: answer with only this JSON:\n" + form
        if not self.parallel:
            when += "\nCall exactly one function."
        return "You can call these functions:\n" + functions + "\n\n" + when


def scan_calls(text: str) -> list[tuple[str | None, str, bool]]:
    """The calls written so far in `text` (a prefix of the calls form): for each, its name
    (None until the name's closing quote), the text of its arguments so far, and whether
    the arguments are complete."""
    calls, depth, in_string, escaped = [], 0, False, False
    key, expect_key, start, args_from = None, False, 0, None
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 3:
                    value = json.loads(text[start:i + 1])
                    if expect_key:
                        key = value
                    elif key == "name":
                        calls[-1][0] = value
            continue
        if ch == '"':
            in_string, start = True, i
        elif ch in "{[":
            depth += 1
            if depth == 3:
                calls.append([None, "", False])
            if depth == 4 and key == "arguments":
                args_from = i
            expect_key = ch == "{"
        elif ch in "}]":
            depth -= 1
            if depth == 3 and args_from is not None:
                calls[-1][1], calls[-1][2], args_from = text[args_from:i + 1], True, None
        elif ch == ",":
            expect_key = True
        elif ch == ":":
            expect_key = False
    if args_from is not None:
        calls[-1][1] = text[args_from:]
    return [tuple(call) for call in calls]


@dataclass
class CallStream:
    """One answer's text, split as it grows into content and call deltas (see the module)."""
    use: ToolUse
    text: str = ""
    branch: str | None = None                      # "text" | "calls", once the first non-space arrives
    ids: list = field(default_factory=list)
    sent: list = field(default_factory=list)       # characters of each call's arguments sent

    def add(self, piece: str) -> tuple[str, list[ToolCallDelta]]:
        """(content delta, call deltas) for the next piece of text."""
        self.text += piece
        if self.branch is None:
            if not self.text.strip():
                return "", []                      # spaces only: which branch is not known yet
            self.branch = "text" if self.use.choice == "auto" and self.text.lstrip()[0] != "{" else "calls"
            if self.branch == "text":
                return self.text, []
        if self.branch == "text":
            return piece, []
        deltas = []
        for index, (name, arguments, _) in enumerate(scan_calls(self.text)):
            if name is None:
                break
            if index == len(self.ids):
                self.ids.append("call_" + uuid.uuid4().hex[:24])
                self.sent.append(0)
                deltas.append(ToolCallDelta(index, self.ids[index], name, ""))
            if len(arguments) > self.sent[index]:
                deltas.append(ToolCallDelta(index, None, None, arguments[self.sent[index]:]))
                self.sent[index] = len(arguments)
        return "", deltas

    def calls(self) -> tuple[ToolCall, ...]:
        """The calls of the answer (the last one's arguments may be cut when the budget ran out)."""
        if self.branch != "calls":
            return ()
        return tuple(ToolCall(self.ids[i], name, arguments)
                     for i, (name, arguments, _) in enumerate(scan_calls(self.text)) if i < len(self.ids))
