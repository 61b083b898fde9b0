"""A tiny Qwen3.5 vision-language model in the layout of mflux2's default VLM,
mlx-community/Qwen3.5-4B-MLX-4bit: the same architecture (hybrid Gated-DeltaNet / full-attention
text layers, the 2x2-merging ViT), config.json with its `quantization`, the 4-bit weights under
mlx-vlm's names (`language_model.model.*`, `vision_tower.*`) with their index, the tokenizer files,
`chat_template.jinja` (the Qwen3.5 template's system / user / image / generation-prompt parts) and
the Qwen3-VL processor configs — written with mlx-vlm's own quantize and save, as `mlx_vlm.convert`
writes the real one. Widths are tiny, nothing is downloaded.

Weights are random except the token embeddings and the output head, which are wired so that greedy
decoding answers with fixed replies: a prompt whose last token is the scoring prefill
`{"scene_score": ` (or the bleed prefill) gets SCORE_REPLY (BLEED_REPLY), anything else gets
CAPTION_REPLY, then the end-of-text token. Each reply is one vocabulary entry; the embeddings are
large enough that the (random) layers do not move the last hidden state off its token's direction.
So the tests see the real mlx-vlm path — processor, vision tower, chat template, generation — and
replies they can parse.
"""

from __future__ import annotations

import json
from pathlib import Path

SCORE_PREFILL = '{"scene_score": '
BLEED_PREFILL = '{"bleed_score": '
SCORE_REPLY = '72, "scene_reason": "the same striped toy", "style_score": 64, "style_reason": "similar soft light"}'
BLEED_REPLY = '10, "bleed_reason": "a generic toy, not the reference one"}'
CAPTION_REPLY = "a toy sitting on a wooden table, soft window light, a plain white wall behind"

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]

# The parts of Qwen3.5's chat template (Qwen/Qwen3.5-4B chat_template.jinja) a VLM prompt uses:
# the render_content macro (images as <|vision_start|><|image_pad|><|vision_end|>), the system and
# user turns, and the generation prompt with its enable_thinking switch; tool calls are left out.
CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set content = render_content(messages[0].content, false, true)|trim %}
    {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""

_CORPUS = ["a photo of a toy cat sitting on a wooden table in soft light",
           "compare the two images for LoRA training evaluation: scene score, style score, reason",
           "write a caption for this training image: background, lighting, camera angle, pose"]

# The Qwen3-VL image processor as mlx-community's Qwen3.5 folders configure it.
_IMAGE_PROCESSOR = {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "image_processor_type": "Qwen3VLImageProcessor", "max_pixels": 16777216,
                    "merge_size": 2, "min_pixels": 65536, "patch_size": 16, "rescale_factor": 1 / 255,
                    "temporal_patch_size": 2}


def _byte_table() -> dict[int, str]:
    """Byte-level BPE's alphabet: byte -> the character that stands for it (GPT-2's bytes_to_unicode)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the unprintable bytes get the characters from U+0100 on
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level(text: str) -> str:
    """`text` in byte-level BPE's alphabet, as vocabulary entries are stored."""
    table = _byte_table()
    return "".join(table[b] for b in text.encode("utf-8"))


def _tokenizer(folder: Path):
    """A byte-level BPE with Qwen3.5's special tokens, the three replies as vocabulary entries and
    the two prefills as added tokens (so a prompt ending in a prefill ends in that one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for reply in (CAPTION_REPLY, SCORE_REPLY, BLEED_REPLY):
        vocab[_byte_level(reply)] = len(vocab)
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=262144)
    fast.add_tokens(["<think>", "</think>", SCORE_PREFILL, BLEED_PREFILL])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    ids = {t: fast.convert_tokens_to_ids(t) for t in SPECIALS + [SCORE_PREFILL, BLEED_PREFILL]}
    ids.update({r: vocab[_byte_level(r)] for r in (CAPTION_REPLY, SCORE_REPLY, BLEED_REPLY)})
    return fast, ids


# mlx-community/Qwen3.5-4B-MLX-4bit's architecture (its config.json, = Qwen/Qwen3.5-4B's): 32 text
# layers, 24 Gated DeltaNet + 8 full attention (every 4th), tied embeddings, a 24-block ViT.
QWEN35_4B = {
    "architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "tie_word_embeddings": True,
    "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053, "vision_end_token_id": 248054,
    "text_config": {
        "model_type": "qwen3_5_text", "hidden_size": 2560, "intermediate_size": 9216, "num_hidden_layers": 32,
        "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256, "vocab_size": 248320,
        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 8, "full_attention_interval": 4,
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128, "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": True, "eos_token_id": 248044,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "partial_rotary_factor": 0.25,
                            "rope_theta": 10000000, "rope_type": "default"},
    },
    "vision_config": {
        "model_type": "qwen3_5", "depth": 24, "hidden_size": 1024, "intermediate_size": 4096, "num_heads": 16,
        "in_channels": 3, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "out_hidden_size": 2560,
        "num_position_embeddings": 2304, "deepstack_visual_indexes": [],
    },
}
# The same with tiny widths: one linear-attention (Gated DeltaNet) and one full-attention layer, a 2-block ViT.
TINY_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 1, "head_dim": 32, "layer_types": ["linear_attention", "full_attention"],
             "full_attention_interval": 2, "linear_key_head_dim": 16, "linear_num_key_heads": 2,
             "linear_num_value_heads": 2, "linear_value_head_dim": 16, "max_position_embeddings": 4096,
             "rope_parameters": {**QWEN35_4B["text_config"]["rope_parameters"], "mrope_section": [2, 1, 1]}}
TINY_VISION = {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 64}


def qwen35_config(ids: dict, vocab: int, tiny: bool = True, tied: bool = True) -> dict:
    """QWEN35_4B (tiny widths with `tiny`) with the token ids and vocabulary of the tokenizer in use."""
    cfg = json.loads(json.dumps(QWEN35_4B))
    if tiny:
        cfg["text_config"].update(json.loads(json.dumps(TINY_TEXT)))
        cfg["vision_config"].update(TINY_VISION)
    cfg.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"], tie_word_embeddings=tied,
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    cfg["text_config"].update(vocab_size=vocab, eos_token_id=ids["<|endoftext|>"], tie_word_embeddings=tied)
    return cfg


def _save(folder: Path, model, config: dict) -> None:
    """As mlx_vlm.convert --quantize writes a folder (4 bits, groups of 64; the vision tower stays
    unquantized), plus the Qwen3-VL processor configs of mlx-community's Qwen3.5 folders."""
    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import save_config, save_weights, skip_multimodal_module

    predicate = getattr(model, "quant_predicate", None)
    model, config = quantize_model(model, config, 64, 4, quant_predicate=lambda p, m: (
        False if skip_multimodal_module(p) else (predicate(p, m) if predicate is not None else True)))
    save_weights(folder, model)
    save_config(config, folder / "config.json")
    (folder / "processor_config.json").write_text(json.dumps(
        {"image_processor": _IMAGE_PROCESSOR, "processor_class": "Qwen3VLProcessor"}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps({**_IMAGE_PROCESSOR, "processor_class": "Qwen3VLProcessor"}, indent=2))


def build_tiny_qwen35(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny scripted Qwen3.5 VLM into `folder` (see the module docstring); returns it."""
    import mlx.core as mx
    from mlx_vlm.models import qwen3_5

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok, ids = _tokenizer(folder)
    vocab = len(tok)
    config = qwen35_config(ids, vocab, tiny=True, tied=False)  # the replies need a head of their own
    mx.random.seed(seed)
    model = qwen3_5.Model(qwen3_5.ModelConfig.from_dict(config))

    # The scripted head: the last token's class picks the next token.
    lm = model.language_model
    hidden = config["text_config"]["hidden_size"]
    direction = {"caption": 0, "score": 1, "bleed": 2, "end": 3}
    klass = {ids[SCORE_PREFILL]: "score", ids[BLEED_PREFILL]: "bleed",
             ids[CAPTION_REPLY]: "end", ids[SCORE_REPLY]: "end", ids[BLEED_REPLY]: "end"}
    basis = mx.eye(hidden)[mx.array([direction[klass.get(t, "caption")] for t in range(vocab)])]
    lm.model.embed_tokens.weight = 40.0 * basis + 0.02 * mx.random.normal((vocab, hidden))
    head = 0.02 * mx.random.normal((vocab, hidden))
    for token, d in {CAPTION_REPLY: "caption", SCORE_REPLY: "score", BLEED_REPLY: "bleed", "<|endoftext|>": "end"}.items():
        head[ids[token]] = 8.0 * mx.eye(hidden)[direction[d]]
    lm.lm_head.weight = head
    mx.eval(model.parameters())
    _save(folder, model, config)
    return folder


def _synthetic_tokenizer(folder: Path, vocab: int, ids: dict[str, int]):
    """A byte-level tokenizer of exactly `vocab` entries with the special tokens at `ids` (Qwen3.5's
    real ids for the full-size model): the 256 byte symbols, fillers, no merges. Every id a random
    model may emit decodes; prompts tokenize byte by byte (longer than with Qwen's merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _byte_table()
    symbols = [table[b] for b in range(256)]
    specials = {i: t for t, i in ids.items()}
    entries = {}
    filler = 0
    for i in range(vocab):
        if i in specials:
            continue
        if i < 256:
            entries[symbols[i]] = i
        else:
            entries[f"<f{filler}>"] = i
            filler += 1
    tok = Tokenizer(models.BPE(vocab=entries, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in sorted(ids.items(), key=lambda x: x[1])]
    spec["model"]["vocab"].update({t: i for t, i in ids.items()})
    tok = Tokenizer.from_str(json.dumps(spec))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   model_max_length=262144)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(folder))
    return fast


def build_random_qwen35(folder: str | Path, full_size: bool = True, seed: int = 0) -> Path:
    """The default VLM's architecture with random weights (full size, or tiny widths), 4-bit, in
    mlx-community's layout, and a synthetic tokenizer that decodes every id: for timing and memory
    (scripts/vlm_benchmark.py), no download. Its replies are noise that runs to max_tokens."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_vlm.models import qwen3_5

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if full_size:
        ids = {"<|endoftext|>": 248044, "<|im_start|>": 248045, "<|im_end|>": 248046, "<|vision_start|>": 248053,
               "<|vision_end|>": 248054, "<|image_pad|>": 248056, "<|video_pad|>": 248057}
        vocab = QWEN35_4B["text_config"]["vocab_size"]
    else:
        ids = {t: 256 + i for i, t in enumerate(SPECIALS)}
        vocab = 512
    _synthetic_tokenizer(folder, vocab, ids)
    config = qwen35_config(ids, vocab, tiny=not full_size, tied=True)
    mx.random.seed(seed)
    model = qwen3_5.Model(qwen3_5.ModelConfig.from_dict(config))
    model.update(tree_map(lambda a: a.astype(mx.bfloat16) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    mx.eval(model.parameters())
    _save(folder, model, config)
    return folder
