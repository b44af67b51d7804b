"""JSON Schema for structured outputs and tool arguments: the check a schema must pass, and
the shortest text that completes a partial value so that it validates.

- check_schema: the schema must be valid under the Draft 2020-12 metaschema (the `jsonschema`
  library: llguidance does not validate schemas) and use only keywords llguidance enforces.
  Either failure is a 400 whose `param` is the schema path, never a keyword silently dropped.
- SEPARATORS: the grammar is compiled with fixed separators (", " and ": ", json.dumps'
  own), so a value has one spelling per content and the completion below can be exact.
- shortest_completion(schema, text): `text` is a prefix of a value the grammar lets through;
  the result finishes the string, number or literal in progress, picks the shortest key,
  enum member or value the schema allows where one is missing, adds the required keys and
  items not yet written, and closes every open object and array. This is what a constrained
  answer writes when its token budget is about to run out (constrained.py), so that a call's
  arguments parse and validate instead of being cut.
"""
import json
import math
import re

from ..errors import LlamaRefError

SEPARATORS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
NUMBER = re.compile(r"-?(0|[1-9][0-9]*)?(\.[0-9]*)?([eE][+-]?[0-9]*)?")


class SchemaError(LlamaRefError, ValueError):
    """A JSON Schema that is invalid or that the grammar engine cannot enforce; `param` is its path."""


def check_schema(schema, param: str) -> None:
    """Raise SchemaError naming the path of the first problem (param + ".properties.x...")."""
    import jsonschema
    import llguidance

    if not isinstance(schema, (dict, bool)):
        raise SchemaError(f"{param}: a JSON Schema is an object or a boolean, got {type(schema).__name__}", param)
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(
        jsonschema.Draft202012Validator.META_SCHEMA).iter_errors(schema))
    if error is not None:
        path = param + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
        raise SchemaError(f"{path}: not valid JSON Schema (Draft 2020-12): {error.message}", path)
    wide = wide_integer_path(schema)
    if wide is not None:
        raise SchemaError(f"{param}{wide}: the grammar engine reads integers from -2**63 to 2**64 - 1", param + wide)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(schema_grammar(schema))
    if failed:
        keys = re.findall(r'"([^"]+)"', messages[0]) if "Unimplemented keys" in messages[0] else []
        path = next((param + p for p in (keyword_path(schema, k) for k in keys) if p is not None), param)
        raise SchemaError(f"{path}: the grammar engine cannot enforce this schema ({messages[0]})", path)


def schema_grammar(schema) -> str:
    """llguidance's grammar for values valid under `schema`, with SEPARATORS (an object schema
    carries them; true and false have nowhere to)."""
    import llguidance
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=SEPARATORS if isinstance(schema, dict)
                                                         else None)


def nodes(schema, path: str = ""):
    """Every value in the schema with its path (".properties.a", ".enum[1]"), each before the
    values it holds."""
    yield path, schema
    if isinstance(schema, dict):
        for key, value in schema.items():
            yield from nodes(value, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            yield from nodes(value, f"{path}[{i}]")


def keyword_path(schema, keyword: str) -> str | None:
    """Where `keyword` first appears as a key in the schema (".properties.a.pattern")."""
    return next((f"{path}.{keyword}" for path, node in nodes(schema) if isinstance(node, dict) and keyword in node),
                None)


def wide_integer_path(schema) -> str | None:
    """Where the first integer lies that llguidance cannot read (its JSON numbers are 64-bit;
    it raises a bare ValueError on a wider one), as ".properties.a.minimum"."""
    return next((path for path, node in nodes(schema) if isinstance(node, int) and not isinstance(node, bool)
                 and not -2**63 <= node < 2**64), None)


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


class Completer:
    """shortest_completion for one schema (its $refs resolved against the root)."""

    def __init__(self, schema):
        self.root = schema

    def growth(self) -> int:
        """An upper bound on how much one token can lengthen the shortest completion: it can
        open at most a key or an item and its value, so the longest key and the longest
        minimal value of any sub-schema, and a few characters of punctuation."""
        values, keys = [0], [0]

        def walk(schema, depth=0):
            if depth > 32 or not isinstance(schema, (dict, list)):
                return
            if isinstance(schema, list):
                for item in schema:
                    walk(item, depth + 1)
                return
            minimal = self.minimal(schema) if "$ref" not in schema else None
            values.append(len(minimal or ""))
            keys.extend(len(dumps(k)) for k in schema.get("properties", {}))
            for value in schema.values():
                walk(value, depth + 1)
        if isinstance(self.root, dict):
            keys.extend(len(dumps(k)) for k in self.root.get("properties", {}))
            for value in self.root.values():       # the root itself is open from the first token
                walk(value)
        return max(values) + max(keys) + 8

    def resolve(self, schema):
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
            target = self.root
            for part in schema["$ref"].lstrip("#").strip("/").split("/"):
                target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if part else target
            schema = target
        return True if schema == {} else schema

    def options(self, schema) -> list:
        """The alternatives a value may follow: anyOf/oneOf branches, or the schema itself."""
        schema = self.resolve(schema)
        if isinstance(schema, dict) and ("anyOf" in schema or "oneOf" in schema):
            return [o for branch in schema.get("anyOf", schema.get("oneOf")) for o in self.options(branch)]
        return [schema]

    def minimal(self, schema) -> str | None:
        """The shortest JSON text valid under `schema` that this rule finds (None: none)."""
        found = [text for text in map(self.minimal_one, self.options(schema)) if text is not None]
        return min(found, key=len, default=None)

    def minimal_one(self, schema) -> str | None:
        if schema is True:
            return "0"
        if schema is False or not isinstance(schema, dict):
            return None
        if "const" in schema:
            return dumps(schema["const"])
        if "enum" in schema:
            return min((dumps(v) for v in schema["enum"]), key=len, default=None)
        kinds = schema.get("type", ["number", "string", "boolean", "null", "array", "object"])
        found = [text for text in (self.minimal_of_type(schema, kind) for kind in
                                   ([kinds] if isinstance(kinds, str) else kinds)) if text is not None]
        return min(found, key=len, default=None)

    def minimal_of_type(self, schema, kind: str) -> str | None:
        if kind == "object":
            return self.close_object(schema, [], first=True)
        if kind == "array":
            return self.close_array(schema, 0, first=True)
        if kind == "string":
            return '"' + "a" * schema.get("minLength", 0) + '"'
        if kind in ("integer", "number"):
            return dumps(smallest_number(schema, kind == "integer"))
        return {"boolean": "true", "null": "null"}.get(kind)

    def properties(self, schema) -> dict:
        return {k: v for option in self.options(schema) if isinstance(option, dict)
                for k, v in option.get("properties", {}).items()}

    def required(self, schema) -> list:
        return [k for option in self.options(schema) if isinstance(option, dict) for k in option.get("required", [])]

    def close_object(self, schema, seen: list, first: bool = False) -> str | None:
        """What closes an object whose keys `seen` are written: the required keys missing,
        in the schema's order, then "}" (of the alternative that makes it shortest)."""
        options = [o for o in self.options(schema) if isinstance(o, dict)]
        if len(options) > 1:
            closes = [self.close_object(o, seen, first) for o in options
                      if all(k in o.get("properties", {}) or o.get("additionalProperties", True) is not False
                             for k in seen if k is not None)]
            return min((c for c in closes if c is not None), key=len, default=None)
        properties = self.properties(schema)
        parts = []
        for key in dict.fromkeys(list(properties) + self.required(schema)):
            if key in self.required(schema) and key not in seen:
                value = self.minimal(properties.get(key, True))
                if value is None:
                    return None
                parts.append(f"{dumps(key)}: {value}")
        body = ", ".join(parts)
        return ("{" if first else "") + (", " if body and seen else "") + body + "}"

    def item_schema(self, schema, index: int):
        schema = self.resolve(schema)
        if not isinstance(schema, dict):
            return True
        prefix = schema.get("prefixItems", [])
        return prefix[index] if index < len(prefix) else schema.get("items", True)

    def close_array(self, schema, count: int, first: bool = False) -> str | None:
        schema = self.resolve(schema)
        least = schema.get("minItems", 0) if isinstance(schema, dict) else 0
        items = [self.minimal(self.item_schema(schema, i)) for i in range(count, least)]
        if None in items:
            return None
        return ("[" if first else "") + (", " if items and count else "") + ", ".join(items) + "]"

    def complete(self, text: str) -> str:
        """The shortest completion of `text` (a prefix of a value valid under the root); ""
        when the value is complete, or when this rule finds no way to finish it (the grammar
        then decides alone)."""
        end, completion = self.value(text, 0, self.root)
        return completion or "" if end >= len(text) else ""

    def value(self, text: str, i: int, schema) -> tuple[int, str | None]:
        """Read the value at text[i:]. (end, None): complete, ending at text[end]; (len(text),
        completion): text ends inside it (completion None: no way to finish it was found)."""
        if i >= len(text):
            return i, self.minimal(schema)
        first = text[i]
        if first == "{":
            return self.object(text, i + 1, schema)
        if first == "[":
            return self.array(text, i + 1, schema)
        if first == '"':
            return self.string(text, i + 1, schema)
        if first in "-0123456789":
            end = i + len(NUMBER.match(text, i).group())
            return (end, None) if end < len(text) else (end, "0" if text[-1] in "-.eE+" else "")
        literal = next((word for word in ("true", "false", "null") if word[0] == first), first)
        end = i + len(literal)
        return (end, None) if end <= len(text) else (len(text), literal[len(text) - i:])

    def string(self, text: str, i: int, schema) -> tuple[int, str | None]:
        """After the opening quote: the string's end, or the rest of the shortest string the
        schema allows that starts with what is written (enum and const members first)."""
        j, escaped = i, False
        while j < len(text):
            if escaped:
                escaped = False
            elif text[j] == "\\":
                escaped = True
            elif text[j] == '"':
                return j + 1, None
            j += 1
        written = text[i:]
        members = [v for option in self.options(schema) if isinstance(option, dict)
                   for v in option.get("enum", [option["const"]] if "const" in option else [])]
        candidates = [dumps(v)[1:] for v in members if isinstance(v, str) and dumps(v)[1:].startswith(written)]
        if candidates:
            return len(text), min(candidates, key=len)[len(written):]
        unicode_left = re.search(r"\\u([0-9a-fA-F]{0,3})$", written)
        tail = "0" * (4 - len(unicode_left.group(1))) if unicode_left else ("n" if escaped else "")
        shortest = min((o.get("minLength", 0) for o in self.options(schema) if isinstance(o, dict)), default=0)
        return len(text), tail + "a" * max(0, shortest - len(written)) + '"'

    def object(self, text: str, i: int, schema) -> tuple[int, str | None]:
        """After "{": keys in the schema's order (as the grammar writes them), ", " and ": "
        between. Of anyOf alternatives, those a written const or enum value rules out are dropped."""
        options = [o for o in self.options(schema) if isinstance(o, dict)] or [{}]
        schema = options[0] if len(options) == 1 else {"anyOf": options}
        properties, seen = self.properties(schema), []
        additional = next((o.get("additionalProperties", True) for o in options), True)
        if i >= len(text):
            return i, self.close_object(schema, seen)
        while text[i] != "}":
            written = None
            if text[i] == '"':
                end, completion = self.string(text, i + 1, True)
                if completion is not None:
                    written = text[i + 1:]
                else:
                    key = json.loads(text[i:end])
                    subs = [o.get("properties", {}).get(key, o.get("additionalProperties", True)) for o in options]
                    sub = subs[0] if all(x == subs[0] for x in subs) else {"anyOf": subs}
                    i, missing = separator(text, end, ": ")
                    if missing is None:
                        start = i
                        i, missing = self.value(text, i, sub)
                        try:            # the value as written, or as the completion finishes it
                            value = json.loads(text[start:i] + (missing or ""))
                        except json.JSONDecodeError:
                            pass
                        else:
                            options = [o for o in options if admits(o, key, value)] or options
                            schema = options[0] if len(options) == 1 else {"anyOf": options}
                            properties = self.properties(schema)
                    else:               # ": " not all written: the value and close of the alternative that is shortest
                        ends = [(self.minimal(o.get("properties", {}).get(key, o.get("additionalProperties", True))),
                                 self.close_object(o, seen + [key])) for o in options]
                        return i, missing + min((v + c for v, c in ends if v is not None and c is not None),
                                                key=len, default="}")
                    seen.append(key)
                    if missing is not None:
                        return i, missing + (self.close_object(schema, seen) or "}")
                    if i >= len(text):
                        return i, self.close_object(schema, seen)
                    if text[i] == "}":
                        break
                    i, missing = separator(text, i, ", ")
                    if missing is None and i < len(text):
                        continue
                    if missing is None:
                        return i, self.key_choice(None, schema, properties, seen, additional)
                    return i, missing + (self.key_choice(None, schema, properties, seen, additional) or "")
            return len(text), self.key_choice(written, schema, properties, seen, additional)
        return i + 1, None

    def key_choice(self, written: str | None, schema, properties: dict, seen: list, additional) -> str | None:
        """The shortest key, value and close of the object, where a key must come next:
        `written` is the part of the key after its quote (None: not even the quote). A key
        declared after the last one seen and not past a missing required one, or (when the
        schema allows more keys) the written text itself; of each alternative of an anyOf."""
        options = [o for o in self.options(schema) if isinstance(o, dict)]
        if len(options) > 1:
            choices = [self.key_choice(written, o, self.properties(o), seen, o.get("additionalProperties", True))
                       for o in options]
            return min((c for c in choices if c is not None), key=len, default=None)
        start = '"' if written is None else ""
        written = written or ""
        order, required = list(properties), set(self.required(schema))
        last = max((order.index(k) for k in seen if k in order), default=-1)
        choices = []
        for key in order[last + 1:]:
            value = self.minimal(properties[key])
            close = self.close_object(schema, seen + [key])
            if dumps(key)[1:].startswith(written) and value is not None and close is not None:
                choices.append(start + dumps(key)[1 + len(written):] + ": " + value + close)
            if key in required:
                break
        value, close = self.minimal(additional), self.close_object(schema, seen + [None])
        if additional is not False and value is not None and close is not None:
            choices.append(start + self.string('"' + written, 1, True)[1] + ": " + value + close)
        return min(choices, key=len, default=None)

    def array(self, text: str, i: int, schema) -> tuple[int, str | None]:
        count = 0
        if i >= len(text):
            return i, self.close_array(schema, count)
        while text[i] != "]":
            i, completion = self.value(text, i, self.item_schema(schema, count))
            count += 1
            if completion is not None:
                return i, completion + (self.close_array(schema, count) or "]")
            if i >= len(text):
                return i, self.close_array(schema, count)
            if text[i] == "]":
                break
            i, missing = separator(text, i, ", ")
            if missing is not None or i >= len(text):
                missing = missing or ""
                item, close = self.minimal(self.item_schema(schema, count)), self.close_array(schema, count + 1)
                return i, missing + (item or "") + (close or "]")
        return i + 1, None


def admits(option: dict, key: str, value) -> bool:
    """Whether an object alternative allows `value` at `key`, as far as its const or enum say."""
    sub = option.get("properties", {}).get(key, option.get("additionalProperties", True))
    if sub is False:
        return False
    if isinstance(sub, dict) and "const" in sub:
        return sub["const"] == value
    if isinstance(sub, dict) and "enum" in sub:
        return value in sub["enum"]
    return True


def separator(text: str, i: int, expected: str) -> tuple[int, str | None]:
    """Past `expected` at text[i]: (its end, None), or (len(text), what of it is missing)."""
    written = text[i:i + len(expected)]
    if written == expected:
        return i + len(expected), None
    return len(text), expected[len(written):]


def smallest_number(schema: dict, integer: bool):
    """The number nearest 0 within the schema's bounds (multipleOf aside)."""
    low = max(schema.get("minimum", -math.inf), schema.get("exclusiveMinimum", -math.inf) + (1 if integer else 1e-9))
    high = min(schema.get("maximum", math.inf), schema.get("exclusiveMaximum", math.inf) - (1 if integer else 1e-9))
    value = min(max(0, low), high)
    return math.ceil(value) if integer and value > 0 else math.floor(value) if integer else value
