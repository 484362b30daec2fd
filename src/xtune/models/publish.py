"""What a saved model folder carries so that other tools use the model as it was trained: the tokenizer with the
training chat template, and a generation config that stops where the template ends a reply."""

import json
from pathlib import Path

from transformers import GenerationConfig, PreTrainedTokenizerBase

from xtune.data.templates import chat_template_jinja, get_template


def save_tokenizer(
    tokenizer: PreTrainedTokenizerBase, folder: Path, prompt_template: str | None, image_token: str | None = None
) -> None:
    """The tokenizer, with `chat_template` set to the training template (`saved_chat_template`) in
    tokenizer_config.json and in chat_template.jinja (which transformers 5 reads first), so other tools prompt the
    model the same way. The tokenizer object itself is left as it was."""
    jinja = saved_chat_template(prompt_template, image_token)
    if jinja is None:
        tokenizer.save_pretrained(folder)
        return
    own, tokenizer.chat_template = tokenizer.chat_template, jinja
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.chat_template = own
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["chat_template"] = jinja
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "chat_template.jinja").write_text(jinja, encoding="utf-8")


def saved_chat_template(prompt_template: str | None, image_token: str | None = None) -> str | None:
    """The chat_template saved with a model trained with `prompt_template` (None for `hf`, the tokenizer's own):
    the template's jinja (`chat_template_jinja`) behind `parts_as_text`, so that message content given as a list
    of parts, as Hugging Face and OpenAI clients send it, is written as the same content given as a string."""
    if not prompt_template or prompt_template == "hf":
        return None
    return parts_as_text(image_token) + chat_template_jinja(prompt_template)


def parts_as_text(image_token: str | None = None) -> str:
    """A jinja preamble that rewrites `messages`: a content that is a list of parts becomes its parts' texts
    joined by newlines (as xtune's server and vLLM join them), an image part (`image`, `image_url`) written as
    `image_token` where it stands, so the template after it sees string content only. Without `image_token` (a
    text model) an image part raises. String content and messages without content are kept as they are."""
    image = (
        f"{{%- set xtune_parts.texts = xtune_parts.texts + [{json.dumps(image_token)}] -%}}"
        if image_token
        else "{{- raise_exception('this model takes no images; send text parts only') -}}"
    )
    return "".join([
        "{%- set xtune_parts = namespace(messages=[], texts=[]) -%}",
        "{%- for message in messages -%}",
        "{%- if message['content'] is defined and message['content'] is not string and message['content'] is iterable -%}",
        "{%- set xtune_parts.texts = [] -%}",
        "{%- for part in message['content'] -%}",
        "{%- if part['type'] == 'text' -%}",
        "{%- set xtune_parts.texts = xtune_parts.texts + [part['text']] -%}",
        "{%- elif part['type'] in ('image', 'image_url') -%}",
        image,
        "{%- else -%}",
        "{{- raise_exception('a message part of type ' + (part['type'] | string) + ' is not supported; send text parts') -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- set xtune_parts.messages = xtune_parts.messages + [dict(message, content=xtune_parts.texts | join('\\n'))] -%}",
        "{%- else -%}",
        "{%- set xtune_parts.messages = xtune_parts.messages + [message] -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- set messages = xtune_parts.messages -%}\n",
    ])  # fmt: skip


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, prompt_template: str | None) -> list[int]:
    """The tokenizer's EOS and each of the template's stop words that is one token (`<|im_end|>`, `<|eot_id|>`,
    `<|end|>`, ...): where a reply ends."""
    words = get_template(prompt_template).stop_words if prompt_template else ()
    eos = getattr(tokenizer, "eos_token_id", None)
    ids = [eos] if eos is not None else []
    for word in words:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if len(pieces) == 1:
            ids += pieces
    return ids


def generation_config_of(model_or_folder) -> GenerationConfig | None:
    """A model's generation config, or the one saved in a model folder; None when there is none."""
    if isinstance(model_or_folder, (str, Path)):
        path = Path(model_or_folder)
        return GenerationConfig.from_pretrained(path) if (path / "generation_config.json").is_file() else None
    return getattr(model_or_folder, "generation_config", None)


def write_generation_config(
    folder: Path, generation_config: GenerationConfig | None, tokenizer: PreTrainedTokenizerBase,
    prompt_template: str | None,
) -> None:
    """generation_config.json with the model's own settings and an `eos_token_id` list that holds the model's own
    stop ids, the tokenizer's EOS and the template's stop tokens, so plain `generate` (and engines that read this
    file) stop where the trained replies end."""
    config = generation_config
    config = GenerationConfig.from_dict(config.to_dict()) if config is not None else GenerationConfig()
    own = config.eos_token_id
    own = [own] if isinstance(own, int) else list(own or [])
    ids = list(dict.fromkeys([*own, *stop_token_ids(tokenizer, prompt_template)]))
    if ids:
        config.eos_token_id = ids
    config.save_pretrained(folder)
