"""Chat formats: a list of messages -> the prompt's token ids, plus the same prompt as text.

Formats (docs/spec/sampling.md §15):
    llama-2    Meta's `chat_completion` (llama/generation.py): each finished turn
               "[INST] {user} [/INST] {answer} " encoded on its own between BOS and EOS ids,
               the last user turn with BOS only, user and answer stripped; the system message
               as "<<SYS>>\n{system}\n<</SYS>>\n\n" in front of the user text it precedes
    mistral    Mistral's instruct format (mistral-common's tokenizer V1): BOS, then
               "[INST] {user} [/INST]" and "{answer}" + EOS encoded piece by piece, nothing
               stripped, the system message as "{system}\n\n" in front of the user text
    chatml     "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then
               "<|im_start|>assistant\n" (Yi-34B-Chat); the markers are ids when the
               vocabulary has them as control tokens, else text
    airoboros  "A chat.\nUSER: {user}\nASSISTANT: {answer}\n...USER: {user}\nASSISTANT: "
               (airoboros' own servers, trailing space included), BOS + one encoding
    template   the model's own Jinja chat template, rendered as transformers'
               apply_chat_template renders it

Conversations (the provider's rule: "(user, assistant, tool)*, user, including one system
message anywhere"; OpenAI and llama.cpp accept several), decided here for the built-in formats:
- system messages anywhere but last. In llama-2 and mistral they are folded into the user
  turn that follows (at the front that is Meta's and Mistral's own behaviour), several
  joined in order by a blank line; chatml renders each in place; airoboros joins them
  instead of the "A chat." preamble.
- content: a string, or OpenAI's list of text parts, joined by newlines.
- an assistant message's tool_calls render as the calls form of decoding/tools.py; a tool
  message answering one (tool_call_id) as "Tool result (name, id): {content}".
- a tool message (a tool's result) is input to the model, like a user message: it may follow
  an assistant or tool message; in llama-2 and mistral its text "Tool result: {content}"
  joins the user turn it belongs to ("\n\n" between consecutive user-side messages); chatml
  renders role "tool"; airoboros a "TOOL: " line.
- the conversation must start with a user message (after any system message) and end with
  a user or tool message: the model answers next. A trailing assistant message (spec §17 C5) is
  rejected, as Meta does.
- text that looks like a control string inside content ("[INST]", "</s>", "<|im_end|>") is
  plain text, never a control id (C7); `reject_control_strings=True` refuses Meta's four
  tags and "<s>", "</s>" instead, as Meta's reference does (C6).
"""
import json
import re
from dataclasses import dataclass
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ..errors import LlamaRefError
from ..tokenizer import Tokenizer
from .tools import ToolUse

FORMATS = ("llama-2", "mistral", "chatml", "airoboros", "template")
ROLES = ("system", "user", "assistant", "tool")
CONTROL_STRINGS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>")
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
AIROBOROS_STOPS = ("USER:", "ASSISTANT:", "### Instruction", "### Response")
CHATML_STOPS = ("<|im_end|>",)
# What a role may follow (None: the start of the conversation, system messages aside).
ALLOWED_AFTER = {"user": {None, "assistant", "tool"}, "assistant": {"user", "tool"}, "tool": {"assistant", "tool"}}


class ChatFormatError(LlamaRefError, ValueError):
    """A conversation the chat format cannot render. `param` is "messages" unless given."""

    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param)


@dataclass(frozen=True)
class ChatPrompt:
    ids: tuple[int, ...]        # what the model reads: BOS/EOS and markers as control ids
    text: str                   # the same prompt as text, with "<s>", "</s>" written out
    stop: tuple[str, ...] = ()  # the format's own stop strings (airoboros, chatml)


def check_messages(messages, reject_control_strings: bool = False) -> list[dict]:
    """The rules above; each error names the message and the rule. Returns the messages with
    their content as one string (text parts joined by newlines), an assistant's tool calls
    as `tool_calls` [{"id", "name", "arguments"}] and a tool message's call as `tool_call`."""
    if not messages:
        raise ChatFormatError("messages: at least one message is needed")
    checked, previous, calls = [], None, {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError(f"messages[{i}]: must be an object with role and content")
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role: must be one of {', '.join(ROLES)}, got {role!r}")
        tool_calls = message_calls(message, i) if role == "assistant" else []
        content = message_text(message.get("content"), i, allow_none=bool(tool_calls))
        if reject_control_strings:
            for tag in CONTROL_STRINGS:
                if tag in content:
                    raise ChatFormatError(f"messages[{i}].content: contains {tag!r}; special tags are not allowed "
                                          "as part of the prompt")
        entry = {"role": role, "content": content}
        if role != "system":
            if previous not in ALLOWED_AFTER[role]:
                after = "the start of the conversation" if previous is None else f"{article(previous)} message"
                raise ChatFormatError(f"messages[{i}].role: {article(role)} message cannot follow {after}")
            previous = role
        if role == "assistant":
            calls = {call["id"]: call for call in tool_calls}
            entry["tool_calls"] = tool_calls
        if role == "tool":
            call_id = message.get("tool_call_id")
            if calls and call_id not in calls:
                raise ChatFormatError(f"messages[{i}].tool_call_id: {call_id!r} is not the id of a call of the "
                                      f"assistant message before it ({', '.join(calls)})", "messages")
            entry["tool_call"] = calls.get(call_id)
        checked.append(entry)
    if checked[-1]["role"] == "system":
        raise ChatFormatError(f"messages[{len(checked) - 1}]: a system message must be followed by a user message")
    if previous not in ("user", "tool"):
        raise ChatFormatError(f"messages[{len(checked) - 1}].role: the conversation must end with a user or tool "
                              f"message (the model answers next), not {previous}")
    return checked


def article(role: str | None) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


def message_text(content, i: int, allow_none: bool = False) -> str:
    """A message's content as one string: a string, or OpenAI's list of parts of which only
    text parts are taken ([{"type": "text", "text": ...}], joined by newlines, as vLLM does)."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ChatFormatError(f"messages[{i}].content: must be a string or a list of text parts, got "
                              f"{type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ChatFormatError(f"messages[{i}].content[{j}].type: only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)


def message_calls(message: dict, i: int) -> list[dict]:
    """An assistant message's tool_calls as [{"id", "name", "arguments" (parsed)}]."""
    calls = message.get("tool_calls") or []
    checked = []
    for j, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ChatFormatError(f"messages[{i}].tool_calls[{j}]: must be {{'id': ..., 'type': 'function', "
                                  "'function': {'name': ..., 'arguments': ...}}")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            raise ChatFormatError(f"messages[{i}].tool_calls[{j}].function.arguments: must be a JSON object as "
                                  "text") from None
        checked.append({"id": call.get("id") or f"call_{i}_{j}", "name": function["name"], "arguments": arguments})
    return checked


def calls_text(calls: list[dict]) -> str:
    """An assistant's tool calls as the model writes them (the form decoding/tools.py enforces)."""
    return json.dumps({"tool_calls": [{"name": c["name"], "arguments": c["arguments"]} for c in calls]},
                      ensure_ascii=False, separators=(", ", ": "))


def said(message: dict, tool_label: str = "Tool result: ") -> str:
    """What a message says in a built-in format: its content, an assistant's calls, or a tool
    result, labelled with the call it answers ("Tool result (name, id): ...") or else with
    tool_label (chatml's role line already says "tool": no label)."""
    if message.get("tool_calls"):
        return calls_text(message["tool_calls"])
    call = message.get("tool_call")
    if message["role"] == "tool":
        return f"Tool result ({call['name']}, {call['id']}): {message['content']}" if call else \
            tool_label + message["content"]
    return message["content"]


def turns(messages: list[dict], system_prefix) -> list[tuple[str, str | None]]:
    """[(user-side text, answer)] with the last answer None: consecutive user and tool
    messages joined, system messages (joined in order) put in front of the next user-side
    text by system_prefix(system, text)."""
    result, user_side, system = [], [], None
    for message in messages:
        role, content = message["role"], said(message)
        if role == "system":
            system = content if system is None else system + "\n\n" + content
            continue
        if role == "assistant":
            result.append(("\n\n".join(user_side), content))
            user_side = []
            continue
        text = content
        if system is not None and not user_side:
            text, system = system_prefix(system, text), None
        user_side.append(text)
    result.append(("\n\n".join(user_side), None))
    return result


def llama_2(messages: list[dict], tokenizer: Tokenizer) -> ChatPrompt:
    """Meta's chat_completion: per-turn encoding with BOS/EOS ids."""
    ids, text = [], ""
    for user, answer in turns(messages, lambda system, user: B_SYS + system + E_SYS + user):
        if answer is None:
            turn = f"{B_INST} {user.strip()} {E_INST}"
            ids += tokenizer.encode(turn, bos=True, eos=False)
            text += "<s>" + turn
        else:
            turn = f"{B_INST} {user.strip()} {E_INST} {answer.strip()} "
            ids += tokenizer.encode(turn, bos=True, eos=True)
            text += "<s>" + turn + "</s>"
    return ChatPrompt(tuple(ids), text)


def native_text(messages, reject_control_strings: bool = False) -> str:
    """The Llama-2 conversation as the provider's native API documents its `input`:
    "[INST] first question [/INST] first answer</s><s>[INST] final question [/INST]". The
    API adds the first BOS itself; unlike Meta's per-turn form there is no space before </s>."""
    parts = []
    for user, answer in turns(check_messages(messages, reject_control_strings),
                              lambda system, user: B_SYS + system + E_SYS + user):
        parts.append(f"{B_INST} {user.strip()} {E_INST}" + ("" if answer is None else f" {answer.strip()}"))
    return "</s><s>".join(parts)


def mistral(messages: list[dict], tokenizer: Tokenizer) -> ChatPrompt:
    """mistral-common's InstructTokenizerV1: nothing stripped, pieces encoded separately."""
    ids, text = [tokenizer.bos_id], "<s>"
    for user, answer in turns(messages, lambda system, user: system + "\n\n" + user):
        turn = f"{B_INST} {user} {E_INST}"
        ids += tokenizer.encode_text(turn)
        text += turn
        if answer is not None:
            ids += tokenizer.encode(answer, bos=False, eos=True)
            text += answer + "</s>"
    return ChatPrompt(tuple(ids), text)


def chatml(messages: list[dict], tokenizer: Tokenizer) -> ChatPrompt:
    """<|im_start|>role\\ncontent<|im_end|>\\n per message, then the assistant's header."""
    pieces = []
    for message in messages:
        pieces += [("<|im_start|>", True), (f"{message['role']}\n", False), (said(message, tool_label=""), False),
                   ("<|im_end|>", True), ("\n", False)]
    pieces += [("<|im_start|>", True), ("assistant\n", False)]
    return encode_pieces(tokenizer, pieces, stop=CHATML_STOPS)


def airoboros(messages: list[dict], tokenizer: Tokenizer) -> ChatPrompt:
    """airoboros 2.x as its authors' servers build it (AIRO lmoe/api.py)."""
    label = {"user": "USER: ", "assistant": "ASSISTANT: ", "tool": "TOOL: "}
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or "A chat."
    lines = [system] + [label[m["role"]] + said(m, tool_label="").strip() for m in messages if m["role"] != "system"]
    text = "\n".join(lines + ["ASSISTANT: "])
    return ChatPrompt(tuple(tokenizer.encode(text, bos=tokenizer.add_bos, eos=False)),
                      ("<s>" if tokenizer.add_bos else "") + text, AIROBOROS_STOPS)


def encode_pieces(tokenizer: Tokenizer, pieces, stop=()) -> ChatPrompt:
    """pieces: (text, is_marker). A marker the vocabulary holds as a control token becomes its
    id; everything else is encoded as plain text, each run of plain pieces at once."""
    controls = tokenizer.special_pieces
    ids, run, text = [], "", ""
    for piece, marker in pieces:
        text += piece
        if marker and piece in controls:
            ids += tokenizer.encode_text(run) if run else []
            ids.append(controls[piece])
            run = ""
        else:
            run += piece
    ids += tokenizer.encode_text(run) if run else []
    return ChatPrompt(tuple(ids), text, stop)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format_string):
    return datetime.now().strftime(format_string)


def render_template(template: str, messages: list[dict], tokenizer: Tokenizer, add_generation_prompt=True,
                    tools: list[dict] | None = None) -> str:
    """As transformers' apply_chat_template(tokenize=False): a sandboxed, immutable jinja2
    environment with trim_blocks and lstrip_blocks, the globals raise_exception and
    strftime_now, a tojson filter that keeps non-ASCII, and the special tokens as variables."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    special = {name: tokenizer.id_to_piece(getattr(tokenizer, f"{name}_id"))
               for name in ("bos", "eos", "unk", "pad") if getattr(tokenizer, f"{name}_id") is not None}
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                tools=tools,
                                                **{f"{name}_token": piece for name, piece in special.items()})
    except jinja2.exceptions.TemplateError as err:
        raise ChatFormatError(f"chat template: {err}") from None


def template_message(message: dict) -> dict:
    """A checked message in the shape templates read (transformers': OpenAI's tool_calls with
    the arguments as an object, and tool_call_id)."""
    shaped = {"role": message["role"], "content": message["content"]}
    if message.get("tool_calls"):
        shaped["tool_calls"] = [{"id": c["id"], "type": "function", "function": {"name": c["name"],
                                                                               "arguments": c["arguments"]}}
                                for c in message["tool_calls"]]
    if message.get("tool_call"):
        shaped["tool_call_id"], shaped["name"] = message["tool_call"]["id"], message["tool_call"]["name"]
    return shaped


def own_template(messages: list[dict], tokenizer: Tokenizer, tools: ToolUse | None = None) -> ChatPrompt:
    """The model's template, rendered; in the text, the control tokens the template wrote
    become ids and the rest is plain text. A message whose content itself contains a control
    token's text is refused: in the rendered string it could not be told from the template's
    own markers (transformers would turn it into the control token)."""
    if not tokenizer.chat_template:
        raise ChatFormatError("chat_format: 'template' needs a chat template, and this model's tokenizer has none",
                              "chat_format")
    controls = tokenizer.special_pieces
    for i, message in enumerate(messages):
        for piece in controls:
            if piece in message["content"]:
                raise ChatFormatError(f"messages[{i}].content: contains {piece!r}, a control token of this model's "
                                      "template; choose a built-in chat_format to send it as text")
    text = render_template(tokenizer.chat_template, [template_message(m) for m in messages], tokenizer,
                           tools=None if tools is None else [tool.openai() for tool in tools.tools])
    if not controls:
        return ChatPrompt(tuple(tokenizer.encode_text(text)), text)
    split = re.split("(" + "|".join(map(re.escape, sorted(controls, key=len, reverse=True))) + ")", text)
    return encode_pieces(tokenizer, [(piece, i % 2 == 1) for i, piece in enumerate(split) if piece])


BUILT_IN = {"llama-2": llama_2, "mistral": mistral, "chatml": chatml, "airoboros": airoboros, "template": own_template}
DEFAULT_FOR_ARCHITECTURE = {"LlamaForCausalLM": "llama-2", "MistralForCausalLM": "mistral"}


def choose_format(tokenizer: Tokenizer, architecture: str, chat_format: str | None) -> str:
    """An explicit chat_format wins; else the model's own template; else the architecture's
    default (Llama: llama-2, Mistral: mistral)."""
    if chat_format is not None:
        if chat_format not in FORMATS:
            raise ChatFormatError(f"chat_format: must be one of {', '.join(FORMATS)}, got {chat_format!r}", "chat_format")
        return chat_format
    if tokenizer.chat_template:
        return "template"
    return DEFAULT_FOR_ARCHITECTURE.get(architecture, "llama-2")


def format_chat(messages, tokenizer: Tokenizer, architecture: str = "LlamaForCausalLM", chat_format: str | None = None,
                reject_control_strings: bool = False, tools: ToolUse | None = None) -> ChatPrompt:
    """The prompt for `messages` ([{"role": ..., "content": ...}]) in the chosen format. With
    tools, tools.system_prompt() is a system message after the leading ones (and a template
    also gets the tools as its `tools` variable)."""
    checked = check_messages(messages, reject_control_strings)
    chosen = choose_format(tokenizer, architecture, chat_format)
    if tools is not None:
        at = next((i for i, m in enumerate(checked) if m["role"] != "system"), 0)
        checked.insert(at, {"role": "system", "content": tools.system_prompt()})
    if chosen == "template":
        return own_template(checked, tokenizer, tools)
    return BUILT_IN[chosen](checked, tokenizer)


def encode_native_input(tokenizer: Tokenizer, text: str) -> list[int]:
    """The native API's raw `input`: BOS + encode(input), except that the literal BOS and EOS
    texts ("<s>", "</s>") become their ids, as the provider's docs write a conversation's
    history ("... first answer</s><s>[INST] ..."). An input that starts with "<s>" gets no
    second BOS. Every other control-looking text stays text."""
    markers = {tokenizer.id_to_piece(i): i for i in (tokenizer.bos_id, tokenizer.eos_id) if i is not None}
    pieces = [p for p in re.split("(" + "|".join(map(re.escape, markers)) + ")", text) if p] if markers else [text]
    starts_with_bos = tokenizer.bos_id is not None and pieces[:1] == [tokenizer.id_to_piece(tokenizer.bos_id)]
    ids = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None and not starts_with_bos else []
    for piece in pieces:
        ids += [markers[piece]] if piece in markers else tokenizer.encode_text(piece)
    return ids
