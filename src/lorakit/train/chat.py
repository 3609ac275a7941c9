"""Chat-like records (alpaca, chat, sharegpt) as conversations, and conversations as the texts
their chat template renders, with the characters to train marked.

Messages take the OpenAI / transformers form:

    {"role": "system" | "user" | "assistant" | "tool",
     "content": "..." | [{"type": "text", "text": "..."}, ...] | null,
     "tool_calls": [{"type": "function", "function": {"name", "arguments"}, "id"?}],   assistant only
     ... other keys (tool_call_id, name, reasoning_content) passed to the template as they are}

and a record may carry `tools`, a list of JSON-schema tool definitions (or a JSON string of one),
given to the template as `tools=`. Text parts are joined with "\\n", as `lorakit serve` joins them,
so a model is trained on the text it is served. `content` may be null only beside tool calls.
Tool-call `arguments` given as a JSON string (OpenAI) are parsed to an object, because
transformers templates write them with `tojson` (Llama 3.1, Qwen2.5, Mistral) and would quote a
string; a flat call `{name, arguments}` is nested under `function` as the templates read it.

Locating the trained text. The template is a black box, so assistant turn i is found by
rendering `messages[:i]` with the generation prompt (the prompt the model answers turn i from)
and `messages[:i+1]` without: the turn is the text between the two, so it includes the
end-of-turn token(s) and the model learns to stop. If both renderings are prefixes of the whole
conversation's rendering, the turn is trained there, in one sequence with the other turns.

Some real templates render a turn differently once later turns follow (Qwen3 drops the
reasoning of turns before the last user message; it writes an empty `<think>` block only for the
final turn), so the whole rendering is not the text the model produced for that turn. Such a turn
is trained in a sequence of its own, `messages[:i+1]`, each later turn that its rendering also
holds unchanged going with it: every assistant turn is trained once, after exactly the prompt it
is answered from at inference. (Templates with `{% generation %}` masks are not needed for this,
and their masks mark the whole rendering, which for Qwen3 is not what the model generated.)
A turn whose own rendering does not start with its prompt (Mistral v0.3 writes the system
message into the last user turn only, so the prompt holds it and the rendered turn does not) is
the prompt followed by the turn as rendered after the prompt's last message (`_turn_after_prompt`),
in a sequence of its own: what the model sees and writes at inference. One that cannot be located
even so, and a turn the template renders as nothing, or without its tool calls, would train the
wrong answer: those are errors naming the record.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import DataError
from ..model_io import join_text_parts

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    """The messages as the chat template takes them: content a string, tool calls normalised."""
    tools: list[dict[str, Any]] | None = None
    """The record's tool definitions, passed to the template as `tools=`."""


@dataclass
class ChatText:
    """One training sequence of a conversation."""
    text: str
    """What the chat template renders for the conversation, or for its first messages (see source)."""
    spans: list[tuple[int, int]]
    """Character spans of `text` to train (the assistant turns; all of it with train_on_inputs)."""
    source: str
    """The record's "path:line", with "(messages[:N])" added when the text renders only those."""
    prompt: str | None = None
    """The prompt of the conversation's final answer, when this sequence ends with it."""
    reference: str | None = None
    """That answer's text (None for an answer that calls tools)."""


# --------------------------------------------------------------------------------- reading records

def read_conversation(record: dict, fmt: str, source: str, system_prompt: str | None) -> Conversation:
    """The record as a validated conversation; `system_prompt` goes first when it has no system message."""
    if fmt == "alpaca":
        instruction = string_field(record, "instruction", fmt, source)
        extra = string_field(record, "input", fmt, source, optional=True)
        output = string_field(record, "output", fmt, source)
        user = instruction + ("\n\n" + extra if extra else "")
        conv = Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    else:
        conv = Conversation(_turns(record, fmt, source), _tools(record.get("tools"), source))
    if system_prompt is not None and not any(m["role"] == "system" for m in conv.messages):
        conv.messages.insert(0, {"role": "system", "content": system_prompt})
    return conv


def string_field(record: dict, key: str, fmt: str, source: str, optional: bool = False) -> str:
    """record[key], which must be a string (absent or null: "" when optional, else an error)."""
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise DataError(f"{source}: missing {key!r} for format {fmt} (record keys: {', '.join(map(str, record))})")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{source}: {key!r} must be a string for format {fmt}, got {type(value).__name__}")
    return value


def _turns(record: dict, fmt: str, source: str) -> list[dict[str, Any]]:
    key, role_key, text_key = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
    if key not in record:
        raise DataError(f"{source}: missing {key!r} for format {fmt} (record keys: {', '.join(map(str, record))})")
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{source}: {key!r} must be a non-empty list of {{{role_key}, {text_key}}} objects, got "
                        f"{turns!r:.60}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{source}: {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{where} must be an object with {role_key!r} and {text_key!r}, got {type(turn).__name__}")
        calls = turn.get("tool_calls") if fmt == "chat" else None   # [] and null (datasets' rows) mean none
        if role_key not in turn or (text_key not in turn and not calls):
            hint = ""
            if fmt == "sharegpt" and "role" in turn and "content" in turn:
                hint = ("; these are the chat format's keys: read the column as chat messages with "
                        "data.columns={conversations: messages}")
            raise DataError(f"{where} needs {role_key!r} and {text_key!r} (keys: {', '.join(map(str, turn))}){hint}")
        role = turn[role_key]
        if fmt == "sharegpt":
            if not isinstance(role, str) or role not in SHAREGPT_ROLES:
                raise DataError(f"{where}: unknown {role_key!r} value {role!r}; known: {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[role], "content": _content(turn[text_key], text_key, where)})
            continue
        if role not in ROLES:
            raise DataError(f"{where}: unknown role {role!r}; known roles: {', '.join(ROLES)}")
        if calls and role != "assistant":
            raise DataError(f"{where}: a {role} message with 'tool_calls'; only assistant turns call tools")
        content = turn.get(text_key)
        if content is None and not calls:
            raise DataError(f"{where}: {text_key!r} is null; only an assistant turn with tool_calls may have none")
        # other keys (tool_call_id, name, reasoning_content) are the template's to read; null means absent
        message = {"role": role, "content": "" if content is None else _content(content, text_key, where)}
        message |= {k: v for k, v in turn.items() if k not in ("role", "content", "tool_calls") and v is not None}
        if calls:
            if not isinstance(calls, list):
                raise DataError(f"{where}: 'tool_calls' must be a list of calls, got {type(calls).__name__}")
            message["tool_calls"] = [_tool_call(call, f"{where}.tool_calls[{j}]") for j, call in enumerate(calls)]
        messages.append(message)
    return messages


def _content(value: Any, key: str, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"{where}: {key!r} must be a string or a list of text parts, got {type(value).__name__}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or not isinstance(part.get("text"), str):
            got = f"{part.get('type')!r} part" if isinstance(part, dict) else type(part).__name__
            raise DataError(f"{where}: {key!r} part {j} must be {{\"type\": \"text\", \"text\": ...}}, got {got}; "
                            f"training takes text only")
        texts.append(part["text"])
    return join_text_parts(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """A call in the nested form templates read, its arguments an object."""
    if not isinstance(call, dict):
        raise DataError(f"{where} must be an object {{type, function: {{name, arguments}}}}, got {type(call).__name__}")
    nested = "function" in call   # else a flat {name, arguments} call
    function = call["function"] if nested else call
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise DataError(f"{where} needs function.name, a non-empty string (keys: {', '.join(map(str, call))})")
    arguments = function.get("arguments")
    if arguments is None:
        arguments = {}
    elif isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: function.arguments is a string but not valid JSON ({e.msg} at column "
                            f"{e.colno}); give a JSON object or its JSON text") from None
    if not isinstance(arguments, dict):
        raise DataError(f"{where}: function.arguments must be a JSON object, got {type(arguments).__name__}")
    if nested:
        keep = {k: v for k, v in call.items() if k != "function" and v is not None}
        spec = {k: v for k, v in function.items() if v is not None}
    else:
        keep = {"id": call["id"]} if call.get("id") is not None else {}
        spec = {}
    return {"type": "function", **keep, "function": {**spec, "name": name, "arguments": arguments}}


def _tools(tools: Any, source: str) -> list[dict[str, Any]] | None:
    if isinstance(tools, str):   # datasets often store the definitions as JSON text
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: 'tools' is a string but not valid JSON ({e.msg} at column {e.colno})") from None
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{source}: 'tools' must be a list of tool definitions (JSON objects), got {tools!r:.60}")
    return tools


# --------------------------------------------------------------------------------------- rendering

def chat_texts(conv: Conversation, source: str, tokenizer: Any, chat_template: str | None,
               train_on_inputs: bool) -> list[ChatText]:
    """The conversation as one or more training sequences, in conversation order (see the module
    docstring for how each assistant turn is located and when it gets a sequence of its own)."""
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{source}: chat-like data needs a chat template and the tokenizer has none; set "
                        f"data.chat_template to a Jinja template (or use the prompt_completion or text format)")
    messages = conv.messages
    n = len(messages)

    def render(upto: int, generation_prompt: bool) -> str:
        return _render(tokenizer, conv, upto, generation_prompt, chat_template, source)

    full = render(n, False)
    last = messages[-1]
    prompt = render(n - 1, True) if last["role"] == "assistant" else None
    reference = last["content"] if prompt is not None and "tool_calls" not in last else None
    if train_on_inputs:
        calls = [name for message in messages for name in _call_names(message)]
        _check_rendered(full, calls, source, "tool calls", "the rendered conversation")
        _check_rendered(full, _tool_names(conv.tools), source, "tools", "the rendered conversation")
        return [ChatText(full, [(0, len(full))], source, prompt, reference)]

    own: dict[int, tuple[int, str]] = {}   # assistant turn i -> (where it starts, rendering of messages[:i+1])
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = prompt if i == n - 1 else render(i, True)
        upto = full if i == n - 1 else render(i + 1, False)
        if not upto.startswith(before):
            upto = _turn_after_prompt(before, upto, message, messages[i - 1] if i else None)
        if upto is None:
            raise DataError(
                f"{source}: the chat template is not prefix-stable: rendering messages[:{i}] with the generation "
                f"prompt does not give the start of messages[:{i + 1}], so assistant turn {i} cannot be located; "
                f"set data.chat_template to a template whose generation prompt starts each assistant turn as the "
                f"template renders it, or set data.train_on_inputs: true")
        if len(upto) == len(before):
            raise DataError(f"{source}: messages[{i}]: the chat template renders this assistant turn as nothing, so "
                            f"there is no answer to train; set data.chat_template to a template that renders it")
        _check_rendered(upto[len(before):], _call_names(message), source, "tool calls",
                        f"what it renders for assistant turn {i}")
        _check_rendered(before, _tool_names(conv.tools), source, "tools", f"the prompt of assistant turn {i}")
        own[i] = (len(before), upto)

    # every turn is trained in the first text, from the whole conversation back, that holds its own rendering
    out: list[ChatText] = []
    pending, text, end = sorted(own), full, n
    while pending:
        here = [i for i in pending if text.startswith(own[i][1])]
        if here:
            out.append(ChatText(text, [(own[i][0], len(own[i][1])) for i in here],
                                source if end == n else f"{source} (messages[:{end}])"))
        pending = [i for i in pending if i not in here]
        if pending:
            end = pending[-1] + 1
            text = own[pending[-1]][1]
    if not out:   # no assistant turn: nothing to train, which the data report counts
        return [ChatText(full, [], source)]
    if prompt is not None:   # the whole conversation's text comes first and ends with the final answer
        out[0].prompt, out[0].reference = prompt, reference
    return out[::-1]


def _turn_after_prompt(before: str, upto: str, message: dict[str, Any], previous: dict[str, Any] | None) -> str | None:
    """The prompt `before` followed by the turn as `upto` renders it, for a template whose prompt is
    not the start of the turn rendered: Mistral v0.3 writes the system message into the last user
    turn only, so the prompt has it and the rendered turn does not. The turn starts after the longest
    tail of the prompt that `upto` repeats right before the answer (whitespace between them is the
    turn's), a tail that must hold the previous message's text, so it is anchored on that message;
    None when it cannot be found so."""
    content = message.get("content") or ""
    at = upto.rfind(content) if content and "tool_calls" not in message else -1
    if at < 0 or previous is None or not isinstance(previous.get("content"), str) or not previous["content"]:
        return None
    head = upto[:at].rstrip()
    same = 0
    while same < min(len(head), len(before)) and head[-1 - same] == before[-1 - same]:
        same += 1
    if previous["content"] not in before[len(before) - same:]:
        return None
    return before + upto[len(head):]


def _render(tokenizer: Any, conv: Conversation, upto: int, generation_prompt: bool, chat_template: str | None,
            source: str) -> str:
    try:
        text = tokenizer.apply_chat_template(conv.messages[:upto], tools=conv.tools, tokenize=False,
                                             add_generation_prompt=generation_prompt, chat_template=chat_template)
    except Exception as e:   # jinja raises its own types, templates raise_exception() with anything
        raise DataError(f"{source}: the chat template failed on this conversation: {e}") from None
    if not isinstance(text, str):
        raise DataError(f"{source}: the chat template rendered {type(text).__name__}, not a string")
    return text


def _call_names(message: dict[str, Any]) -> list[str]:
    return [call["function"]["name"] for call in message.get("tool_calls", ())]


def _tool_names(tools: list[dict[str, Any]] | None) -> list[str]:
    names = []
    for tool in tools or ():
        spec = tool.get("function", tool)
        if isinstance(spec, dict) and isinstance(spec.get("name"), str):
            names.append(spec["name"])
    return names


def _check_rendered(text: str, names: list[str], source: str, what: str, where: str) -> None:
    """A template that ignores tool calls or tools would train answers the model cannot make sense
    of (an empty turn in place of a call), so every function name must appear where it belongs."""
    missing = next((name for name in names if name not in text), None)
    if missing is not None:
        raise DataError(f"{source}: the chat template does not render the {what} ({missing!r} is not in {where}); "
                        f"set data.chat_template to the model's own tool-calling template, or drop the {what} "
                        f"from the data")
