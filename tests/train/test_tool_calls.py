"""Tool calls, tool results and content parts in chat training data (OpenAI / transformers form):
what reaches the template, what is trained, and the errors for what cannot be trained.

A small tool-aware template in the built-in template's style shows exactly what the template is
given (arguments as JSON, ids, tool definitions); the real families' tool templates are tested in
test_real_chat_templates.py.
"""

from __future__ import annotations

import json

import pytest
from test_data import END, jsonl, trained_runs

from lorakit.builtin import build_tokenizer
from lorakit.builtin.model import CHAT_TEMPLATE
from lorakit.serve.protocol import Message
from lorakit.train.config import DataSection, TrainConfig
from lorakit.train.data import DataError, Example, build_datasets, to_examples
from lorakit.train.preview import preview_data

TOOL_TEMPLATE = (
    "{% if tools %}<|system|>\ntools: {{ tools | map(attribute='function.name') | join(', ') }}<|end|>\n{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>\n{% if m.tool_call_id %}[{{ m.tool_call_id }}] {% endif %}"
    "{{ m.content }}{% for c in m.tool_calls or [] %}<call id={{ c.id }}>{{ c.function.name }}"
    "{{ c.function.arguments | tojson }}</call>{% endfor %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C"},
            {"role": "assistant", "content": "It is 18C."}]
RENDERED_CALL = '<call id=c1>get_weather{"city": "Paris"}</call>'


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def examples(record: dict, tok, template: str | None = TOOL_TEMPLATE, **cfg) -> list[Example]:
    return to_examples(record, "t.jsonl:3", "auto", tok, DataSection(train="t.jsonl", chat_template=template, **cfg))


def error(record: dict, tok, template: str | None = TOOL_TEMPLATE, **cfg) -> str:
    with pytest.raises(DataError) as e:
        examples(record, tok, template, **cfg)
    return str(e.value)


def test_the_call_is_trained_and_the_tool_result_is_not(tok):
    [one] = examples({"messages": MESSAGES, "tools": [WEATHER]}, tok)
    assert tok.decode(one.input_ids, skip_special_tokens=False) == (
        "<|system|>\ntools: get_weather<|end|>\n<|user|>\nWeather in Paris?<|end|>\n<|assistant|>\n" + RENDERED_CALL
        + END + "<|tool|>\n[c1] 18C<|end|>\n<|assistant|>\nIt is 18C." + END)
    assert trained_runs(one, tok) == [RENDERED_CALL + END, "It is 18C." + END]
    assert one.reference == "It is 18C."


def test_arguments_as_json_text_a_dict_or_a_flat_call_are_the_same(tok):
    """OpenAI writes arguments as JSON text, transformers as a dict: templates `tojson` them, so
    the text is parsed first; a flat {name, arguments} call is nested under "function"."""
    def with_call(call: dict) -> list[int]:
        messages = [MESSAGES[0], {"role": "assistant", "content": "", "tool_calls": [call]}]
        [one] = examples({"messages": messages}, tok)
        return one.input_ids

    as_text = with_call(CALL)
    assert with_call({**CALL, "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}) == as_text
    assert with_call({"id": "c1", "name": "get_weather", "arguments": {"city": "Paris"}}) == as_text
    no_arguments = with_call({"id": "c1", "function": {"name": "get_weather"}})
    assert tok.decode(no_arguments, skip_special_tokens=False).endswith("<call id=c1>get_weather{}</call>" + END)


def test_a_call_as_the_final_answer_has_no_text_reference(tok):
    [one] = examples({"messages": MESSAGES[:2]}, tok)
    assert trained_runs(one, tok) == [RENDERED_CALL + END]
    assert one.prompt_ids is not None and one.reference is None   # nothing to compare generated text with


def test_text_parts_are_joined_as_serve_joins_them(tok):
    parts = [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}]
    [one] = examples({"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [
        {"type": "text", "text": "Sunny."}]}]}, tok, None)
    served = Message(role="user", content=parts).text(0)
    assert served == "Weather\nin Paris?"
    assert tok.decode(one.input_ids, skip_special_tokens=False) == (
        f"<|user|>\n{served}<|end|>\n<|assistant|>\nSunny." + END)
    assert trained_runs(one, tok) == ["Sunny." + END]


def test_null_keys_of_dataset_rows_mean_absent(tok):
    """datasets gives every row every column: null tool_calls / tool_call_id / tools are not there."""
    messages = [{"role": "user", "content": "hi", "tool_calls": None, "tool_call_id": None},
                {"role": "assistant", "content": "yo", "tool_calls": [], "tool_call_id": None}]
    [one] = examples({"messages": messages, "tools": None}, tok)
    assert tok.decode(one.input_ids, skip_special_tokens=False) == "<|user|>\nhi<|end|>\n<|assistant|>\nyo" + END
    [two] = examples({"messages": messages, "tools": json.dumps([WEATHER])}, tok)   # tools as JSON text
    assert tok.decode(two.input_ids, skip_special_tokens=False).startswith("<|system|>\ntools: get_weather<|end|>\n")


def test_a_template_that_ignores_tool_calls_is_an_error(tok):
    """The built-in template renders content only: the call would be trained as an empty answer."""
    record = {"messages": [MESSAGES[0], {"role": "assistant", "content": "", "tool_calls": [CALL]}]}
    message = ("t.jsonl:3: the chat template does not render the tool calls ('get_weather' is not in {}); set "
               "data.chat_template to the model's own tool-calling template, or drop the tool calls from the data")
    assert error(record, tok, CHAT_TEMPLATE) == message.format("what it renders for assistant turn 1")
    assert error(record, tok, CHAT_TEMPLATE, train_on_inputs=True) == message.format("the rendered conversation")


def test_a_template_that_ignores_tools_is_an_error(tok):
    assert error({"messages": MESSAGES[:1] + [{"role": "assistant", "content": "x"}], "tools": [WEATHER]}, tok,
                 CHAT_TEMPLATE) == (
        "t.jsonl:3: the chat template does not render the tools ('get_weather' is not in the prompt of assistant "
        "turn 1); set data.chat_template to the model's own tool-calling template, or drop the tools from the data")


def test_a_template_that_renders_an_assistant_turn_as_nothing_is_an_error(tok):
    drops = ("{% for m in messages %}{% if m.role != 'assistant' %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n"
             "{% endif %}{% endfor %}")
    assert error({"messages": MESSAGES[:1] + [{"role": "assistant", "content": "x"}]}, tok, drops) == (
        "t.jsonl:3: messages[1]: the chat template renders this assistant turn as nothing, so there is no answer "
        "to train; set data.chat_template to a template that renders it")


def test_a_template_error_names_the_record(tok):
    strict = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}" \
             "{{ m.content }}{% endfor %}"
    assert error({"messages": MESSAGES}, tok, strict) == (
        "t.jsonl:3: the chat template failed on this conversation: no tool role")


@pytest.mark.parametrize(("messages", "tools", "message"), [
    ([{"role": "assistant", "content": None}], None,
     "t.jsonl:3: messages[0]: 'content' is null; only an assistant turn with tool_calls may have none"),
    ([{"role": "user", "content": None}], None,
     "t.jsonl:3: messages[0]: 'content' is null; only an assistant turn with tool_calls may have none"),
    ([{"role": "assistant", "tool_calls": []}], None,
     "t.jsonl:3: messages[0] needs 'role' and 'content' (keys: role, tool_calls)"),
    ([{"role": "user", "content": "a", "tool_calls": [CALL]}], None,
     "t.jsonl:3: messages[0]: a user message with 'tool_calls'; only assistant turns call tools"),
    ([{"role": "assistant", "tool_calls": CALL}], None,
     "t.jsonl:3: messages[0]: 'tool_calls' must be a list of calls, got dict"),
    ([{"role": "assistant", "tool_calls": ["get_weather"]}], None,
     "t.jsonl:3: messages[0].tool_calls[0] must be an object {type, function: {name, arguments}}, got str"),
    ([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}], None,
     "t.jsonl:3: messages[0].tool_calls[0] needs function.name, a non-empty string (keys: function)"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city: 1}"}}]}], None,
     "t.jsonl:3: messages[0].tool_calls[0]: function.arguments is a string but not valid JSON (Expecting property "
     "name enclosed in double quotes at column 2); give a JSON object or its JSON text"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}], None,
     "t.jsonl:3: messages[0].tool_calls[0]: function.arguments must be a JSON object, got list"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], None,
     "t.jsonl:3: messages[0]: 'content' part 0 must be {\"type\": \"text\", \"text\": ...}, got 'image_url' part; "
     "training takes text only"),
    ([{"role": "user", "content": ["a"]}], None,
     "t.jsonl:3: messages[0]: 'content' part 0 must be {\"type\": \"text\", \"text\": ...}, got str; training takes "
     "text only"),
    ([{"role": "user", "content": "a"}], {"name": "f"},
     "t.jsonl:3: 'tools' must be a list of tool definitions (JSON objects), got {'name': 'f'}"),
    ([{"role": "user", "content": "a"}], "[{",
     "t.jsonl:3: 'tools' is a string but not valid JSON (Expecting property name enclosed in double quotes at "
     "column 3)"),
], ids=["null-answer", "null-user", "no-content-no-calls", "user-calls", "calls-not-list", "call-not-object",
        "no-name", "arguments-not-json", "arguments-not-object", "image-part", "part-not-object", "tools-not-list",
        "tools-not-json"])
def test_malformed_tool_data_is_named(tok, messages, tools, message):
    assert error({"messages": messages, **({"tools": tools} if tools is not None else {})}, tok) == message


def test_preview_shows_the_call_as_trained(tmp_path, tok):
    path = jsonl(tmp_path / "tools.jsonl", [{"messages": MESSAGES, "tools": [WEATHER]}])
    cfg = TrainConfig(data=DataSection(train=str(path), chat_template=TOOL_TEMPLATE))
    text = preview_data(cfg, tok, n=1)
    assert (f"<|assistant|>\n[[{RENDERED_CALL}<|end|>\n]]<|tool|>\n[c1] 18C<|end|>\n<|assistant|>\n"
            f"[[It is 18C.<|end|>\n]]") in text
    train, _, report = build_datasets(cfg.data, tok, seed=0)
    assert report.trained_tokens == sum(len(tok(t, add_special_tokens=False).input_ids)
                                        for t in (RENDERED_CALL + END, "It is 18C." + END))
