"""Chat templates for base models that ship without one.

A raw pretrained model (gemma3-270m) has no chat template. tunesmith gives it
one built from the model's own special tokens, so the turn markers it learns in
fine-tuning are tokens it already has embeddings for, and it records which
template it used so training, chat, serving and export all agree.

Every template here renders each message as its own turn (no merging of the
system prompt into the first user turn), which keeps rendering prefix-stable:
the text of the first k messages is a prefix of the text of all messages. The
data layer's loss masks rely on that.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatTemplate:
    """A named Jinja chat template and the token that ends an assistant turn."""

    name: str
    jinja: str
    end_of_turn: str


GEMMA_TURNS = ChatTemplate(
    name="tunesmith:gemma-turns",
    end_of_turn="<end_of_turn>",
    jinja=(
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    ),
)

CHATML = ChatTemplate(
    name="tunesmith:chatml",
    end_of_turn="<|im_end|>",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
)


def plain_template(eos_token: str) -> ChatTemplate:
    """A text-only template for tokenizers with no turn tokens at all; turns end with EOS."""
    return ChatTemplate(
        name="tunesmith:plain",
        end_of_turn=eos_token,
        jinja=(
            "{% for message in messages %}"
            "{{ '### ' + message['role'] | capitalize + ':\n' + message['content'] }}"
            "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n\n' }}"
            "{% endfor %}"
            "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
        ),
    )


def template_for_tokens(vocab: set[str], eos_token: str | None) -> ChatTemplate:
    """Choose a template that fits the special tokens a tokenizer already has."""
    if {"<start_of_turn>", "<end_of_turn>"} <= vocab:
        return GEMMA_TURNS
    if {"<|im_start|>", "<|im_end|>"} <= vocab:
        return CHATML
    if not eos_token:
        raise ValueError("the tokenizer has no EOS token, so no chat template can end a turn")
    return plain_template(eos_token)


def end_of_turn_token(chat_template: str, vocab: set[str], eos_token: str | None) -> str:
    """The token that closes an assistant turn under ``chat_template``."""
    for candidate in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        if candidate in vocab and candidate in chat_template:
            return candidate
    if eos_token:
        return eos_token
    raise ValueError("cannot tell which token ends an assistant turn in this chat template")
