"""Tiny stand-ins for the FLUX.2 text-encoder tokenizers, saved as real `tokenizer/` folders.

Each builder trains a byte-level BPE of a few hundred tokens with the `tokenizers` library (a few
milliseconds), gives it the special tokens and the chat template of the real tokenizer, and saves it
with `save_pretrained`, so `transformers.AutoTokenizer.from_pretrained(folder)` loads it like the
checkpoint's own `tokenizer/` folder:

- `build_qwen3_tokenizer`: klein's Qwen3 tokenizer — ChatML specials, `<think>`/`</think>`, pad token
  `<|endoftext|>`, right padding, the Qwen3 chat template (with the `enable_thinking` switch).
- `build_mistral_tokenizer`: dev's Mistral-Small-3.1 (tekken) tokenizer — the control tokens at
  their real ids (`<s>`=1, `[INST]`=3, `[IMG]`=10, `<pad>`=11, `[SYSTEM_PROMPT]`=17, ...), left
  padding, and the Mistral-Small-3.1 chat template (system prompt first, content given as text
  blocks, as FLUX.2 formats it). diffusers' Flux2Pipeline passes a `PixtralProcessor` wrapping this
  tokenizer; for text-only input the processor's `apply_chat_template` tokenizes exactly like the
  tokenizer's (no added special tokens, same padding/truncation), and `PixtralProcessor` needs
  torchvision, so tests pass the tokenizer itself.

The vocabularies are tiny, so pair them with a model config whose `vocab_size` is at least
`len(tokenizer)` (`TINY_VOCAB` is a safe value).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

TINY_VOCAB = 512  # model vocab_size that covers every id these tokenizers produce

# A small corpus: enough merges that prompts tokenize into a realistic mix of short and long pieces.
_CORPUS = [
    "a photo of a cat sitting on a red chair in a sunny garden",
    "an oil painting of a lighthouse at dusk, dramatic clouds, warm light",
    "a close-up portrait of an old fisherman with a grey beard and a blue hat",
    "a futuristic city skyline at night with neon signs and flying cars",
    "a bowl of fresh fruit on a wooden table, soft morning light, still life",
    "the quick brown fox jumps over the lazy dog near the river bank",
    "You are an AI that reasons about image descriptions. You give structured responses "
    "focusing on object relationships, object attribution and actions without speculation.",
    "user assistant system think image text prompt description style detailed photograph",
]

# The Qwen3 chat template as published with Qwen/Qwen3-4B and Qwen/Qwen3-8B (tokenizer_config.json).
QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
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
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

# The chat template of mistralai/Mistral-Small-3.1-24B-Instruct-2503's processor (the FLUX.2-dev
# tokenizer): system prompt first; message contents may be lists of {"type": "text"} blocks.
MISTRAL_CHAT_TEMPLATE = """{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\\n\\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \\"What are some good restaurants around me?\\" => \\"Where are you?\\" or \\"When is the next flight to Tokyo\\" => \\"Where do you travel from?\\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0] is string %}
        {%- set system_message = messages[0]['content'] %}
        {%- set loop_messages = messages[1:] %}
    {%- else %} 
        {%- set system_message = messages[0]['content'][0]['text'] %}
        {%- set loop_messages = messages[1:] %}
    {%- endif %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
            {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
            {%- else %}
                    {{- '[INST]' }}
                    {%- for block in message['content'] %}
                            {%- if block['type'] == 'text' %}
                                    {{- block['text'] }}
                            {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}
                                    {{- '[IMG]' }}
                                {%- else %}
                                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                                {%- endif %}
                        {%- endfor %}
                    {{- '[/INST]' }}
                {%- endif %}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""

QWEN3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN3_ADDED = ["<think>", "</think>"]  # added (not special) tokens, as in Qwen3's tokenizer
# tekken control tokens at their real ids 0..19
MISTRAL_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
    "[TOOL_CONTENT]",
]  # fmt: skip


def _train_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def build_qwen3_tokenizer(folder: str | Path, vocab_size: int = 400):
    """Save a tiny Qwen3-style tokenizer to `folder`; returns the loaded AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = _train_bpe(QWEN3_SPECIALS, vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="right",
        model_max_length=131072,
        chat_template=QWEN3_CHAT_TEMPLATE,
    )
    tok.add_tokens(QWEN3_ADDED)
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def build_mistral_tokenizer(folder: str | Path, vocab_size: int = 400):
    """Save a tiny Mistral-Small-3.1-style (tekken) tokenizer to `folder`; returns the AutoTokenizer."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    raw = _train_bpe(MISTRAL_SPECIALS, vocab_size)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
        model_max_length=131072,
        chat_template=MISTRAL_CHAT_TEMPLATE,
    )
    tok.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))

