"""Response-only masks under the chat templates of real model families, set on the built-in byte
tokenizer with each family's special tokens added (so a marker like <|im_end|> is one token, as in
the real tokenizer).

The templates below are written from the models' tokenizer_config.json files, shortened where it
changes nothing here (Llama 3.1's built-in tools are left out), but keeping what each does that
matters for locating the assistant turns: Llama 3.1's headers, fixed system block and tools in
the first user message; ChatML for Qwen2.5 and SmolLM2, each with its default system message;
Qwen3 dropping the reasoning of turns before the last user message and writing an empty think
block for the final turn; Gemma 2 refusing a system message and Gemma 3 folding it into the first
user turn, both calling the assistant "model"; Mistral v0.3's [INST] alternation, which puts the
system message into the last user turn only.

Every test asserts the exact trained text: each assistant turn as its template renders it, with
its end-of-turn token, and nothing of the system, user or tool messages.
"""

from __future__ import annotations

import functools
import json

import pytest
from test_data import trained_runs

from lorakit.builtin import build_tokenizer
from lorakit.train.config import DataSection
from lorakit.train.data import DataError, Example, build_datasets, to_examples

LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools_in_user_message and not tools is none %}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
    {%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_TOKENS = ["<|im_start|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
                 "</tool_response>"]
FAMILIES = {   # name: (template, bos, eos, the family's other control tokens)
    "llama3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"]),
    "qwen2.5": (QWEN25, None, "<|im_end|>", CHATML_TOKENS),
    "qwen3": (QWEN3, None, "<|im_end|>", CHATML_TOKENS),
    "gemma2": (GEMMA2, "<bos>", "<end_of_turn>", ["<start_of_turn>"]),
    "gemma3": (GEMMA3, "<bos>", "<end_of_turn>", ["<start_of_turn>"]),
    "mistral-v0.3": (MISTRAL_V03, "<s>", "</s>", ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                  "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]),
    "smollm2": (SMOLLM2, None, "<|im_end|>", CHATML_TOKENS),
}


@functools.cache
def family_tokenizer(name: str):
    template, bos, eos, extra = FAMILIES[name]
    tok = build_tokenizer()
    tok.add_special_tokens({"eos_token": eos, "additional_special_tokens": extra}
                           | ({"bos_token": bos} if bos else {}))
    tok.chat_template = template
    return tok


def samples(record: dict, family: str, **cfg) -> list[Example]:
    return to_examples(record, "chat.jsonl:7", "auto", family_tokenizer(family), DataSection(train="x", **cfg))


def trained(examples: list[Example], family: str) -> list[str]:
    """The trained runs of all the record's samples, in order."""
    return [run for example in examples for run in trained_runs(example, family_tokenizer(family))]


def text(example: Example, family: str) -> str:
    return family_tokenizer(family).decode(example.input_ids, skip_special_tokens=False)


SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Spain?"}, {"role": "assistant", "content": "Madrid."}]

# (family, system message rendered?, the trained runs of SYSTEM + TWO_TURNS (or TWO_TURNS alone))
PREFIX_STABLE = [
    ("llama3.1", True, ["Paris.<|eot_id|>", "Madrid.<|eot_id|>"]),
    ("qwen2.5", True, ["Paris.<|im_end|>\n", "Madrid.<|im_end|>\n"]),
    ("smollm2", True, ["Paris.<|im_end|>\n", "Madrid.<|im_end|>\n"]),
    ("gemma2", False, ["Paris.<end_of_turn>\n", "Madrid.<end_of_turn>\n"]),
    ("gemma3", True, ["Paris.<end_of_turn>\n", "Madrid.<end_of_turn>\n"]),
    ("mistral-v0.3", False, [" Paris.</s>", " Madrid.</s>"]),
]


@pytest.mark.parametrize(("family", "with_system", "runs"), PREFIX_STABLE, ids=[c[0] for c in PREFIX_STABLE])
def test_every_assistant_turn_is_trained_in_one_sample(family, with_system, runs):
    messages = ([SYSTEM] if with_system else []) + TWO_TURNS
    [one] = samples({"messages": messages}, family)
    assert trained([one], family) == runs
    tok = family_tokenizer(family)
    assert text(one, family) == tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(one.prompt_ids, skip_special_tokens=False) == tok.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True)
    assert one.reference == "Madrid."


def test_the_families_render_their_own_way():
    """What the masks above were located in: each family's own markup."""
    messages = [SYSTEM, *TWO_TURNS]
    assert text(samples({"messages": messages}, "llama3.1")[0], "llama3.1") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
        "Today Date: 26 Jul 2024\n\nBe brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nCapital of "
        "France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|><|start_header_id|>"
        "user<|end_header_id|>\n\nAnd of Spain?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "Madrid.<|eot_id|>")
    assert text(samples({"messages": TWO_TURNS}, "qwen2.5")[0], "qwen2.5").startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n")
    assert text(samples({"messages": TWO_TURNS}, "smollm2")[0], "smollm2").startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n")
    assert text(samples({"messages": messages}, "gemma3")[0], "gemma3") == (
        "<bos><start_of_turn>user\nBe brief.\n\nCapital of France?<end_of_turn>\n<start_of_turn>model\nParis."
        "<end_of_turn>\n<start_of_turn>user\nAnd of Spain?<end_of_turn>\n<start_of_turn>model\nMadrid.<end_of_turn>\n")
    assert text(samples({"messages": TWO_TURNS}, "mistral-v0.3")[0], "mistral-v0.3") == (
        "<s>[INST] Capital of France?[/INST] Paris.</s>[INST] And of Spain?[/INST] Madrid.</s>")


def test_qwen3_trains_each_turn_with_its_reasoning_after_its_own_prompt():
    """Qwen3 renders the reasoning of turns before the last user message away, so the whole
    conversation is not what the model wrote for turn 1: that turn gets a sample of its own,
    messages[:3], which is the prompt it is answered from plus the turn with its reasoning."""
    first, second = "<think>\nFrance: Paris.\n</think>\n\nParis.", "<think>\nSpain: Madrid.\n</think>\n\nMadrid."
    messages = [SYSTEM, TWO_TURNS[0], {"role": "assistant", "content": first}, TWO_TURNS[2],
                {"role": "assistant", "content": second}]
    turn1, whole = samples({"messages": messages}, "qwen3")
    assert trained([turn1], "qwen3") == [first + "<|im_end|>\n"]
    assert trained([whole], "qwen3") == [second + "<|im_end|>\n"]
    assert text(turn1, "qwen3") == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?"
                                    "<|im_end|>\n<|im_start|>assistant\n" + first + "<|im_end|>\n")
    # in the whole conversation turn 1 is context, without its reasoning, as the model sees it for turn 2
    assert "<|im_start|>assistant\nParis.<|im_end|>\n<|im_start|>user\nAnd of Spain?" in text(whole, "qwen3")
    assert (turn1.source, whole.source) == ("chat.jsonl:7 (messages[:3])", "chat.jsonl:7")
    assert turn1.prompt_ids is None and whole.reference == second   # the record's answer is the final one
    # without reasoning the final turn still gets the empty think block Qwen3 writes for it
    turn1, whole = samples({"messages": [SYSTEM, *TWO_TURNS]}, "qwen3")
    assert trained([turn1, whole], "qwen3") == ["<think>\n\n</think>\n\nParis.<|im_end|>\n",
                                                "<think>\n\n</think>\n\nMadrid.<|im_end|>\n"]


def test_per_turn_samples_are_counted_in_the_report(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"messages": [SYSTEM, *TWO_TURNS]}) + "\n" + json.dumps({"messages": TWO_TURNS[:2]})
                    + "\n")
    train, _, report = build_datasets(DataSection(train=str(path)), family_tokenizer("qwen3"), seed=0)
    assert [e.source for e in train] == [f"{path}:1 (messages[:3])", f"{path}:1", f"{path}:2"]
    assert (report.read, report.used_train, report.per_turn, report.per_turn_samples) == (2, 3, 1, 2)
    assert report.splits["train"].records == report.splits["train"].kept == 2
    assert ("per turn: 1 conversations gave 2 samples, since the chat template renders earlier turns differently "
            "(e.g. without their reasoning): each assistant turn is trained once, after the prompt it is answered "
            "from") in report.lines()


def test_gemma2_refuses_a_system_message_by_name():
    with pytest.raises(DataError) as e:
        samples({"messages": [SYSTEM, *TWO_TURNS]}, "gemma2")
    assert str(e.value) == "chat.jsonl:7: the chat template failed on this conversation: System role not supported"


def test_mistral_v03_system_message_trains_each_turn_after_its_own_prompt():
    """Mistral v0.3 writes the system message into the last user turn only, so each turn's prompt
    (with it) is not the start of the turn rendered (without it): each turn is trained after its
    own prompt, as the model answers at inference, in a sample of its own."""
    messages = [SYSTEM, *TWO_TURNS]
    tok = family_tokenizer("mistral-v0.3")
    first, second = samples({"messages": messages}, "mistral-v0.3")
    assert trained([first, second], "mistral-v0.3") == [" Paris.</s>", " Madrid.</s>"]
    assert text(first, "mistral-v0.3") == "<s>[INST] Be brief.\n\nCapital of France?[/INST] Paris.</s>"
    assert text(second, "mistral-v0.3") == (tok.apply_chat_template(messages[:4], tokenize=False, add_generation_prompt=True)
                                            + " Madrid.</s>")
    assert "Be brief." in text(second, "mistral-v0.3").split("[/INST] Paris.</s>")[1]   # in the last user turn
    assert (first.source, second.source) == ("chat.jsonl:7 (messages[:3])", "chat.jsonl:7")
    assert second.reference == "Madrid."


def test_a_turn_that_cannot_be_located_is_refused_by_name():
    """A template that renders the answer where no tail of the prompt anchors it is refused, with the fixes."""
    template = ("{% for m in messages %}{% if m.role == 'user' %}{{ 'Q: ' + m.content + '\n' }}{% else %}"
                "{{ 'A: ' + m.content + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '>>' }}"
                "{% endif %}")
    with pytest.raises(DataError, match=r"^chat\.jsonl:7: the chat template is not prefix-stable: rendering "
                                        r"messages\[:1\] with the generation prompt does not give the start of "
                                        r"messages\[:2\], so assistant turn 1 cannot be located; set "
                                        r"data.chat_template .* or set data.train_on_inputs: true$"):
        to_examples({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "hi"}]},
                    "chat.jsonl:7", "auto",
                    family_tokenizer("smollm2"), DataSection(train="x", chat_template=template))


# ------------------------------------------------------------------------------------- tool calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CALL = {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}


def tool_record(call_content: str | None = None, answer: str = "It is 18C.", system: bool = True) -> dict:
    return {"tools": [WEATHER], "messages": [
        *([SYSTEM] if system else []), {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": call_content, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call00001", "content": "18C"},
        {"role": "assistant", "content": answer}]}


QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_qwen25_tool_call_turn_is_trained_and_the_tool_result_is_not():
    [one] = samples(tool_record(), "qwen2.5")
    assert trained([one], "qwen2.5") == [QWEN_CALL + "<|im_end|>\n", "It is 18C.<|im_end|>\n"]
    whole = text(one, "qwen2.5")
    assert whole.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert '"name": "get_weather", "description": "Weather in a city."' in whole   # the definitions, untrained
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response><|im_end|>\n" in whole


def test_qwen3_tool_calls_with_and_without_reasoning():
    think = "<think>\nI need the weather.\n</think>\n\n"
    answer = "<think>\nThe tool said 18C.\n</think>\n\nIt is 18C."
    # reasoning on the call: rendered the same wherever the turn stands, one sample
    [one] = samples(tool_record(think, answer), "qwen3")
    assert trained([one], "qwen3") == [think + QWEN_CALL + "<|im_end|>\n", answer + "<|im_end|>\n"]
    # none: as the final turn it gets an empty think block, as context none, so a sample of its own
    call, whole = samples(tool_record(None, answer), "qwen3")
    assert trained([call], "qwen3") == ["<think>\n\n</think>\n\n" + QWEN_CALL + "<|im_end|>\n"]
    assert trained([whole], "qwen3") == [answer + "<|im_end|>\n"]
    assert "<|im_start|>assistant\n" + QWEN_CALL + "<|im_end|>\n<|im_start|>user\n<tool_response>" in text(whole, "qwen3")


def test_llama31_tool_call_and_result():
    [one] = samples(tool_record(), "llama3.1")
    assert trained([one], "llama3.1") == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                          "It is 18C.<|eot_id|>"]
    whole = text(one, "llama3.1")
    assert "Environment: ipython\n" in whole
    assert '<|start_header_id|>user<|end_header_id|>\n\nGiven the following functions' in whole   # tools, untrained
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"18C"<|eot_id|>' in whole


def test_mistral_v03_tool_call_keeps_its_id():
    [one] = samples(tool_record(system=False), "mistral-v0.3")
    assert trained([one], "mistral-v0.3") == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
        " It is 18C.</s>"]
    assert text(one, "mistral-v0.3").startswith('<s>[AVAILABLE_TOOLS] [{"type": "function", "function": '
                                                '{"name": "get_weather"')
    assert '[TOOL_RESULTS] {"content": 18C, "call_id": "call00001"}[/TOOL_RESULTS]' in text(one, "mistral-v0.3")


def test_a_template_without_tool_support_is_refused_for_tool_calls():
    """Gemma renders an assistant turn's content only: the call would be trained as an empty answer."""
    record = tool_record(system=False)
    record["messages"] = record["messages"][:2]
    del record["tools"]
    with pytest.raises(DataError) as e:
        samples(record, "gemma3")
    assert str(e.value) == ("chat.jsonl:7: the chat template does not render the tool calls ('get_weather' is not "
                            "in what it renders for assistant turn 1); set data.chat_template to the model's own "
                            "tool-calling template, or drop the tool calls from the data")
