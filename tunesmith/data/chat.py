"""Render conversations with the model's chat template; token ids and loss masks.

The single place where messages become text, shared by training
(:func:`encode_messages`) and by inference, evaluation and the service
(:func:`render_prompt`), so a model is asked in exactly the form it was taught.

Tool calls and tool schemas become text in :mod:`tunesmith.data.messages`.

Loss masks. The conversation is rendered to one string; the character span of
every assistant message with weight 1 — its rendered content plus the
end-of-turn token that closes it, never the turn header such as
``<|im_start|>assistant\\n`` — is found by rendering the conversation turn by
turn (the templates are prefix-stable: the text of the first k messages is a
prefix of the whole; :class:`ChatRenderer` verifies this once per tokenizer);
the string is then tokenized once, and a token is labelled when its first
character lies inside a span.
"""

from __future__ import annotations

import bisect
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

from tunesmith.data.messages import (  # noqa: F401  (re-exported: the chat API in one place)
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    assistant_text,
    content_text,
    drop_system,
    parse_tool_calls,
    template_messages,
    tools_text,
)
from tunesmith.errors import TunesmithError
from tunesmith.models.templates import end_of_turn_token

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy skips


@dataclass
class EncodedExample:
    """Token ids and labels of one conversation.

    Attributes:
        input_ids: the rendered conversation's tokens (cut to ``max_length``).
        labels: ``-100`` where no loss; the token id on assistant tokens of weight 1,
            including the end-of-turn token that closes each such turn.
        truncated_tokens: how many tokens ``max_length`` cut off (0 if none).
    """

    input_ids: list[int]
    labels: list[int]
    truncated_tokens: int = 0

    @property
    def trainable_tokens(self) -> int:
        """How many tokens carry loss."""
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _weight(message: dict) -> int:
    weight = message.get("weight")
    return 1 if weight is None else int(weight)


class TemplateError(TunesmithError):
    """The chat template cannot render a conversation (or cannot be masked turn by turn)."""


class ChatRenderer:
    """A tokenizer's chat template, checked once, with fast rendering, spans and tokenizing.

    Args:
        tokenizer: a fast transformers tokenizer with a chat template
            (``tunesmith.models.loading.load_tokenizer`` guarantees one).

    Raises:
        TunesmithError: no chat template, not a fast tokenizer, or a template whose
            rendering is not prefix-stable (so loss masks could not be found reliably).
    """

    def __init__(self, tokenizer):
        if not tokenizer.chat_template:
            raise TunesmithError("the tokenizer has no chat template",
                                 "load it with tunesmith.models.loading.load_tokenizer, which provides one")
        if not getattr(tokenizer, "is_fast", False):
            raise TunesmithError("tunesmith needs a fast (Rust) tokenizer to find loss masks",
                                 "save the model with a tokenizer.json")
        self.tokenizer = tokenizer
        self.template = tokenizer.chat_template
        self.backend = tokenizer.backend_tokenizer
        vocab = set(tokenizer.get_vocab())
        self.end_of_turn = end_of_turn_token(self.template, vocab, tokenizer.eos_token)
        # the added tokens written by the template itself (turn markers): user text containing
        # them would be read as markers, which `data check` warns about
        self.markers = tuple(sorted(t.content for t in tokenizer.added_tokens_decoder.values()
                                    if t.special and t.content.strip() and t.content in self.template))
        self._compiled = None
        self._template_kwargs = dict(tokenizer.special_tokens_map)
        self._compiled = self._fast_template()
        self._check_prefix_stable()

    def render(self, messages: list[dict], *, generation_prompt: bool = False) -> str:
        """Render template messages (from :func:`template_messages`) to text."""
        try:
            if self._compiled is not None:
                return self._render_direct(self._compiled, messages, generation_prompt)
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja's TemplateError / raise_exception in a model's own template
            raise TemplateError(f"the chat template cannot render this conversation: {exc}",
                                "the model's chat template decides which roles and turn orders it accepts "
                                "(some require user/assistant alternation): adapt the conversation or the model") from exc

    def _fast_template(self):
        """The template compiled by transformers, called directly, when it renders exactly as
        ``apply_chat_template`` does.

        Why: ``apply_chat_template`` deep-copies and sanitises every conversation first,
        which is half the cost of ``data check``; the messages here are already plain
        string dicts, so that step changes nothing. Verified on probe conversations;
        any difference (or a transformers without the helper) keeps the public path.
        """
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            compiled = _compile_jinja_template(self.template)
        except Exception:
            return None
        # the variables every render passes, merged with the template's globals once
        self._variables = dict(compiled.globals, tools=None, documents=None, **self._template_kwargs)
        for probe in _PROBES:
            for k in range(1, len(probe) + 1):
                for generation_prompt in (False, True):
                    public = self._outcome(lambda: self.tokenizer.apply_chat_template(
                        probe[:k], tokenize=False, add_generation_prompt=generation_prompt))
                    direct = self._outcome(lambda: self._render_direct(compiled, probe[:k], generation_prompt))
                    if direct != public:
                        return None
        return compiled

    def _render_direct(self, compiled, messages: list[dict], generation_prompt: bool) -> str:
        """``compiled.render(...)`` without its per-call merge of the template globals.

        Why: ``Template.render`` copies the globals and keyword arguments into a new dict
        on every call, a third of the rendering time for short conversations; a shared
        context built from the premerged :attr:`_variables` is the same context (jinja's
        documented ``new_context(vars, shared=True)``), still rendered in the sandbox.
        """
        context = compiled.new_context({**self._variables, "messages": messages,
                                        "add_generation_prompt": generation_prompt}, shared=True)
        try:
            return compiled.environment.concat(compiled.root_render_func(context))
        except Exception:
            compiled.environment.handle_exception()

    @staticmethod
    def _outcome(render) -> str | type:
        """The rendered text, or the type of the error rendering raised."""
        try:
            return render()
        except Exception as exc:
            return type(exc)

    def render_with_spans(self, messages: list[dict], tools: list[dict] | None = None
                          ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans that carry loss.

        Returns:
            (text, [(start, end), ...]) — one span per assistant message of weight 1,
            covering its rendered content and the end-of-turn token after it.
        """
        shown = template_messages(messages, tools)
        offset = len(shown) - len(messages)  # 1 when a tools-only system message was put first
        full = self.render(shown)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            j = i + offset
            through = full if j == len(shown) - 1 else self.render(shown[: j + 1])
            if not full.startswith(through):
                raise self._unstable(f"the first {j + 1} messages do not render as a prefix of the whole")
            target = shown[j]["content"] + self.end_of_turn
            start = through.rfind(target)
            if start < 0:
                raise self._unstable("an assistant message does not appear verbatim followed by "
                                     f"{self.end_of_turn}")
            if _weight(message) == 1:
                spans.append((start, start + len(target)))
        return full, spans

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """The text a model is asked with: the messages plus the assistant generation header."""
        return self.render(template_messages(messages, tools), generation_prompt=True)

    def tokenize(self, texts: list[str]):
        """Token encodings (ids + character offsets) of rendered texts, batched in Rust.

        The text already holds the template's special tokens (BOS where the model
        wants one), so none are added.
        """
        return self.backend.encode_batch(texts, add_special_tokens=False)

    def _unstable(self, detail: str) -> TemplateError:
        return TemplateError(f"the chat template of this model cannot be masked turn by turn: {detail}",
                             "tunesmith needs a template that renders each message as its own turn "
                             "(prefix-stable), such as the model's own ChatML or tunesmith's gemma-turns")

    def _check_prefix_stable(self) -> None:
        """Render probe conversations turn by turn; generation prompts must match training text.

        A probe the template refuses (say, one with a tool turn) is skipped: conversations
        like it are then reported one by one, at their lines.
        """
        checked = 0
        for probe in _PROBES:
            try:
                full = self.render(probe)
            except TemplateError:
                continue
            checked += 1
            for j, message in enumerate(probe):
                if message["role"] != "assistant":
                    continue
                asked = self.render(probe[:j], generation_prompt=True)
                through = self.render(probe[: j + 1])
                if not full.startswith(through):
                    raise self._unstable(f"the first {j + 1} messages do not render as a prefix of the whole")
                if not through.startswith(asked + message["content"] + self.end_of_turn):
                    raise self._unstable("the generation prompt is not the text before an assistant answer")
        if not checked:
            raise self._unstable("it refuses every probe conversation")


_PROBES = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Goodbye."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}],
    [{"role": "user", "content": "Call it"}, {"role": "assistant", "content": "<tool_call>\n{}\n</tool_call>"},
     {"role": "tool", "content": "{\"ok\": true}"}, {"role": "assistant", "content": "Done."}],
]
_RENDERERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def renderer_for(tokenizer) -> ChatRenderer:
    """The (cached) :class:`ChatRenderer` of ``tokenizer``; rebuilt if its chat template changed."""
    renderer = _RENDERERS.get(tokenizer)
    if renderer is None or renderer.template != tokenizer.chat_template:
        renderer = ChatRenderer(tokenizer)
        _RENDERERS[tokenizer] = renderer
    return renderer


def labels_for(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels: the token id where the token's first character lies in a span, else -100."""
    labels = [IGNORE_INDEX] * len(ids)
    for begin, end in spans:
        first, stop = tokens_starting_before(offsets, begin), tokens_starting_before(offsets, end)
        labels[first:stop] = ids[first:stop]
    return labels


def tokens_starting_before(offsets: list[tuple[int, int]], position: int, hi: int | None = None) -> int:
    """How many tokens (among the first ``hi``) start before character ``position``.

    Token starts never decrease, and a tuple ``(start, end)`` sorts before
    ``(position,)`` exactly when ``start < position``: one bisection, no list of starts.
    """
    return bisect.bisect_left(offsets, (position,), 0, len(offsets) if hi is None else hi)


def batched(items: Iterable, size: int) -> Iterator[list]:
    """Lists of ``size`` consecutive items (the last one shorter)."""
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def tokenized_batches(renderer: ChatRenderer, batches: Iterable[list[tuple]]) -> Iterator[tuple[list, list]]:
    """Each batch of ``(text, ...)`` items with the tokenizer encodings of its texts, in order.

    Batch k is tokenized on a helper thread (the Rust tokenizer releases the GIL and
    spreads a batch over the cores) while this thread produces batch k+1 (reading,
    rendering): Python and Rust work at the same time. At most two batches are held.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunesmith-tokenize") as pool:
        pending = None
        for batch in batches:
            tokenizing = pool.submit(renderer.tokenize, [item[0] for item in batch])
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, tokenizing)
        if pending is not None:
            yield pending[0], pending[1].result()


def encode_rendered(encoding, spans: list[tuple[int, int]], max_length: int | None) -> EncodedExample:
    """An :class:`EncodedExample` from a tokenizer encoding and the loss spans of its text."""
    ids = encoding.ids
    labels = labels_for(ids, encoding.offsets, spans)
    cut = 0
    if max_length is not None and len(ids) > max_length:
        cut = len(ids) - max_length
        ids, labels = ids[:max_length], labels[:max_length]
    return EncodedExample(ids, labels, cut)


def encode_messages(tokenizer, messages: list[dict], *, max_length: int | None = None,
                    tools: list[dict] | None = None) -> EncodedExample:
    """Token ids and loss labels of one conversation, rendered with the tokenizer's chat template.

    Args:
        tokenizer: a fast tokenizer with a chat template.
        messages: normalised messages (see :class:`tunesmith.data.Example`).
        max_length: cut the tokens to this many (the cut count is returned).
        tools: function schemas offered in this conversation.

    Raises:
        TemplateError: the template cannot render the conversation.
    """
    renderer = renderer_for(tokenizer)
    text, spans = renderer.render_with_spans(messages, tools)
    return encode_rendered(renderer.tokenize([text])[0], spans, max_length)


def encode_examples(tokenizer, examples, *, max_length: int | None = None, without_system: bool = False,
                    batch_size: int = 512):
    """Encode many examples, tokenizing in batches while the next batch renders (fast for training sets).

    Args:
        tokenizer: a fast tokenizer with a chat template.
        examples: :class:`tunesmith.data.Example` objects.
        max_length: cut each example to this many tokens.
        without_system: drop system messages first (training with ``--drop-system``).
        batch_size: texts tokenized per Rust call.

    Yields:
        One :class:`EncodedExample` per example, in order.
    """
    renderer = renderer_for(tokenizer)

    def rendered() -> Iterator[list[tuple[str, list]]]:
        for batch in batched(examples, batch_size):
            yield [renderer.render_with_spans(drop_system(e.messages) if without_system else e.messages, e.tools)
                   for e in batch]

    for batch, encodings in tokenized_batches(renderer, rendered()):
        for (_, spans), encoding in zip(batch, encodings):
            yield encode_rendered(encoding, spans, max_length)


def render_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    """The text a model is asked with for generation: ``messages`` plus the assistant header.

    Rendered exactly as in training, so the tokens before an assistant answer are the same.

    Raises:
        TunesmithError: the last message is an assistant message (the answer to generate).
    """
    if messages and messages[-1].get("role") == "assistant":
        raise TunesmithError("the prompt ends with an assistant message",
                             "pass the messages before the answer the model should write")
    return renderer_for(tokenizer).prompt(messages, tools)


def encode_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of :func:`render_prompt`, tokenized exactly as in training."""
    renderer = renderer_for(tokenizer)
    return list(renderer.tokenize([render_prompt(tokenizer, messages, tools)])[0].ids)
