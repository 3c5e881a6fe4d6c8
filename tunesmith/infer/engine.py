"""The generation engine: chat, chat streaming and raw completions on any model reference.

One engine holds each base model once; LoRA-family adapters attach to it on
demand through peft, so many fine-tuned models share one copy of their base.
Fully fine-tuned models are models of their own (a base with its own scheduler).

Generation is continuously batched (``batching.py``): one scheduler thread per
loaded base model decodes every concurrent request in one forward pass per step,
the base and all its plain LoRA adapters mixed in one batch (``batched_lora.py``);
adapters peft must run itself (DoRA...) get a scheduler of their own each. On a
CPU, each linear layer multiplies a decode step's few rows in the form measured
fastest for its shape when the base was loaded (``decode_linear.py``). The
answers are those of transformers' ``generate`` on each prompt alone (greedy when
the temperature is 0), to float rounding.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from tunesmith.errors import TunesmithError
from tunesmith.infer.batched_lora import BatchedLora
from tunesmith.infer.batching import GenerationRequest, Scheduler
from tunesmith.infer.decode_linear import use_fastest_decode_linears
from tunesmith.infer.resolve import ModelSource, locate
from tunesmith.infer.streaming import DeltaStreamer, cut_at_stop
from tunesmith.infer.types import Completion, GenerationSettings
from tunesmith.models.attention import attention_kernels

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class _LoadedBase:
    """A base model in memory, the adapters attached to it (adapter key -> peft name) and its schedulers.

    ``lock`` guards the model: each forward pass and each adapter attach holds it.
    ``schedulers`` maps None (the base and every plain LoRA adapter, batched together)
    or a peft adapter name (one peft runs itself) to the scheduler that decodes it.
    """

    path: Path
    model: torch.nn.Module
    adapters: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    lora: BatchedLora = field(default_factory=BatchedLora)
    schedulers: dict[str | None, Scheduler] = field(default_factory=dict)


@dataclass
class ModelHandle:
    """A resolved model ready to generate: its source, tokenizer and end-of-turn ids.

    Attributes:
        source: where the model came from (kind, paths, drop_system).
        tokenizer: the tokenizer with the chat template used in training.
        eos_ids: token ids that end an answer (end of turn, then EOS).
        base_key: which loaded base runs it.
        adapter_name: the peft adapter to activate, or None for the plain model.
        context_length: the most tokens the model reads.
    """

    source: ModelSource
    tokenizer: object
    eos_ids: list[int]
    base_key: str
    adapter_name: str | None
    context_length: int | None

    @property
    def name(self) -> str:
        """Display name of the model."""
        return self.source.name

    @property
    def drop_system(self) -> bool:
        """Training dropped the system prompt: ask without one."""
        return self.source.drop_system


class CompletionStream:
    """Text deltas of one streamed answer; ``completion`` holds the totals once it is exhausted."""

    def __init__(self, deltas: Iterator[str], cancel: threading.Event):
        self._deltas = deltas
        self._cancel = cancel
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        """Stop generating (the client went away)."""
        self._cancel.set()
        self._deltas.close()


class Engine:
    """Loads models once and generates with them; safe to share between threads.

    Args:
        device: "cpu", "cuda", "cuda:1"...; default CUDA when present, else the CPU.
        dtype: weights dtype; default bf16 on capable GPUs, fp32 elsewhere.
    """

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        from tunesmith.models.loading import default_dtype, pick_device

        self.device = pick_device(str(device) if device is not None else None)
        self.dtype = dtype or default_dtype(self.device)
        self._lock = threading.RLock()
        self._bases: dict[str, _LoadedBase] = {}
        self._handles: dict[tuple, ModelHandle] = {}

    # ----- resolving and loading -------------------------------------------------------------

    def resolve(self, model_ref: str | Path) -> ModelHandle:
        """Resolve and load ``model_ref`` (base name, model folder, run, final/ or checkpoint folder).

        Raises:
            NotFoundError: nothing of that name; TunesmithError: a folder that cannot load.
        """
        source = locate(str(model_ref))
        key = (source.kind, str(source.path.resolve()), _weights_stamp(source.path))
        with self._lock:
            handle = self._handles.get(key)
            if handle is None:
                handle = self._load(source)
                self._handles[key] = handle
            return handle

    def loaded(self) -> list[str]:
        """Names of the models that have been resolved so far."""
        with self._lock:
            return [h.name for h in self._handles.values()]

    def _load(self, source: ModelSource) -> ModelHandle:
        model_folder = source.base_path if source.is_adapter else source.path
        base = self._base(model_folder)
        adapter_name = self._attach(base, source.path) if source.is_adapter else None
        tokenizer_folder = source.path if _has_tokenizer(source.path) else model_folder
        tokenizer, eos_ids = _tokenizer_and_eos(tokenizer_folder, source.path)
        config = getattr(_unwrap(base.model), "config", None)
        return ModelHandle(source=source, tokenizer=tokenizer, eos_ids=eos_ids, base_key=str(model_folder.resolve()),
                           adapter_name=adapter_name,
                           context_length=getattr(config, "max_position_embeddings", None))

    def _base(self, folder: Path) -> _LoadedBase:
        from tunesmith.models.loading import load_causal_lm

        key = str(folder.resolve())
        if key not in self._bases:
            model = load_causal_lm(folder, device=self.device, dtype=self.dtype)
            model.eval()
            use_fastest_decode_linears(model)
            self._bases[key] = _LoadedBase(path=folder, model=model)
        return self._bases[key]

    def _attach(self, base: _LoadedBase, adapter: Path) -> str:
        """Attach the adapter in ``adapter`` to ``base`` once; returns its peft name."""
        key = f"{adapter.resolve()}@{_weights_stamp(adapter)}"
        if key in base.adapters:
            return base.adapters[key]
        name = "a" + hashlib.sha1(key.encode()).hexdigest()[:12]
        stale = [k for k in base.adapters if k.split("@")[0] == str(adapter.resolve())]
        with base.lock:  # never while a forward pass runs
            self._load_adapter(base, adapter, name, stale)
        base.adapters[key] = name
        return name

    @staticmethod
    def _load_adapter(base: _LoadedBase, adapter: Path, name: str, stale: list[str]) -> None:
        """Load the adapter's weights into ``base`` as ``name``, drop ``stale`` ones, restack the LoRA weights."""
        from peft import PeftModel

        try:
            with warnings.catch_warnings():
                # peft reads a deprecated transformers property while loading; not the user's concern
                warnings.simplefilter("ignore", FutureWarning)
                if isinstance(base.model, PeftModel):
                    base.model.load_adapter(str(adapter), adapter_name=name, is_trainable=False)
                else:
                    base.model = PeftModel.from_pretrained(base.model, str(adapter), adapter_name=name,
                                                           is_trainable=False)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise TunesmithError(f"cannot attach the adapter in {adapter} to {base.path}: {exc}",
                                 "check that the adapter was trained on this base model") from exc
        for old in stale:  # the same folder was trained again: drop the old weights
            base.model.delete_adapter(base.adapters.pop(old))
        base.model.eval()
        base.lora.rebuild(base.model)

    # ----- prompts ---------------------------------------------------------------------------

    def prompt_ids(self, model_ref: str | Path | ModelHandle, messages: list[dict],
                   tools: list[dict] | None = None) -> list[int]:
        """The token ids the model reads for ``messages`` (chat template + generation header).

        Rendered and tokenized exactly as in training (the data layer's ``encode_prompt``).
        """
        from tunesmith.data.chat import encode_prompt

        handle = self._handle(model_ref)
        return encode_prompt(handle.tokenizer, messages, tools)

    def count_prompt_tokens(self, model_ref: str | Path | ModelHandle, messages: list[dict],
                            tools: list[dict] | None = None) -> int:
        """How many prompt tokens ``messages`` cost on this model."""
        return len(self.prompt_ids(model_ref, messages, tools))

    # ----- generation ------------------------------------------------------------------------

    def chat(self, model_ref: str | Path | ModelHandle, messages: list[dict],
             settings: GenerationSettings | None = None, tools: list[dict] | None = None) -> Completion:
        """Answer a conversation: the assistant's next turn.

        Args:
            model_ref: model reference or a handle from :meth:`resolve`.
            messages: OpenAI-style messages (role, content).
            settings: generation settings (default: greedy, 256 tokens).
            tools: function schemas offered to the model, rendered as in training.
        """
        start = time.perf_counter()
        handle = self._handle(model_ref)
        ids = self.prompt_ids(handle, messages, tools)
        return self._generate(handle, ids, settings or GenerationSettings(), start=start)

    def complete(self, model_ref: str | Path | ModelHandle, prompt: str,
                 settings: GenerationSettings | None = None) -> Completion:
        """Continue a raw prompt (legacy completions: no chat template)."""
        start = time.perf_counter()
        handle = self._handle(model_ref)
        ids = _encode(handle.tokenizer, prompt, special=True)
        return self._generate(handle, ids, settings or GenerationSettings(), start=start)

    def chat_stream(self, model_ref: str | Path | ModelHandle, messages: list[dict],
                    settings: GenerationSettings | None = None, tools: list[dict] | None = None) -> CompletionStream:
        """Answer a conversation as a stream of text deltas.

        Returns:
            a :class:`CompletionStream`: iterate it for the deltas; its ``completion`` (text, token
            counts, finish reason, latency) is set once the iteration ends.
        """
        start = time.perf_counter()
        handle = self._handle(model_ref)
        ids = self.prompt_ids(handle, messages, tools)
        return self._stream(handle, ids, settings or GenerationSettings(), start)

    def complete_stream(self, model_ref: str | Path | ModelHandle, prompt: str,
                        settings: GenerationSettings | None = None) -> CompletionStream:
        """Continue a raw prompt as a stream of text deltas."""
        start = time.perf_counter()
        handle = self._handle(model_ref)
        ids = _encode(handle.tokenizer, prompt, special=True)
        return self._stream(handle, ids, settings or GenerationSettings(), start)

    def _stream(self, handle: ModelHandle, ids: list[int], settings: GenerationSettings,
                start: float) -> CompletionStream:
        deltas: queue.Queue = queue.Queue()
        cancel = threading.Event()
        done = object()
        result: dict = {}

        def work() -> None:
            try:
                result["completion"] = self._generate(handle, ids, settings, start=start,
                                                      on_delta=deltas.put, cancel=cancel)
            except BaseException as exc:  # handed to the reading thread, raised there
                result["error"] = exc
            finally:
                deltas.put(done)

        def read() -> Iterator[str]:
            worker = threading.Thread(target=work, name="tunesmith-generate", daemon=True)
            worker.start()
            try:
                while (item := deltas.get()) is not done:
                    yield item
            finally:
                cancel.set()
                worker.join()
            if "error" in result:
                raise result["error"]
            stream.completion = result["completion"]

        stream = CompletionStream(read(), cancel)
        return stream

    def _handle(self, model_ref: str | Path | ModelHandle) -> ModelHandle:
        return model_ref if isinstance(model_ref, ModelHandle) else self.resolve(model_ref)

    def _generate(self, handle: ModelHandle, ids: list[int], settings: GenerationSettings, *, start: float,
                  on_delta=None, cancel: threading.Event | None = None) -> Completion:
        """Generate for one prompt in its base model's running batch; waits until it is finished."""
        if handle.context_length is not None and len(ids) >= handle.context_length:
            raise TunesmithError(f"the prompt has {len(ids)} tokens; {handle.name} reads at most "
                                 f"{handle.context_length}", "shorten the conversation", param="messages")
        decode = _decoder(handle.tokenizer, handle.eos_ids)
        streamer = DeltaStreamer(decode, on_delta, settings.stop) if on_delta is not None else None
        on_token = None
        if streamer is not None:
            streamer.put(torch.tensor(ids))  # the streamer skips its first call: the prompt
            on_token = lambda token: streamer.put(torch.tensor([token]))  # noqa: E731
        eos_ids = frozenset() if settings.ignore_eos else frozenset(handle.eos_ids)
        request = GenerationRequest(prompt=list(ids), adapter=handle.adapter_name, settings=settings,
                                    eos_ids=eos_ids, decode=decode, on_token=on_token, cancel=cancel)
        self._scheduler(handle).generate(request)
        new_ids = list(request.tokens)
        text, hit_stop = cut_at_stop(decode(new_ids), settings.stop)
        ended = bool(new_ids) and new_ids[-1] in eos_ids
        finish = "stop" if (ended or hit_stop or (cancel is not None and cancel.is_set())) else "length"
        if streamer is not None:
            streamer.finish(text)
        return Completion(text=text, prompt_tokens=len(ids), completion_tokens=len(new_ids),
                          finish_reason=finish, latency_s=time.perf_counter() - start, token_ids=new_ids)

    def _scheduler(self, handle: ModelHandle) -> Scheduler:
        """The scheduler that decodes ``handle``'s requests (started on first use)."""
        with self._lock:
            base = self._bases[handle.base_key]
            lane = None if base.lora.supports(handle.adapter_name) else handle.adapter_name
            scheduler = base.schedulers.get(lane)
            if scheduler is None:
                scheduler = Scheduler(_forward_pass(base, lane), self.device,
                                      name=f"tunesmith-batch-{base.path.name}" + (f"-{lane}" if lane else ""),
                                      row_order=base.lora.row_order if lane is None else None)
                base.schedulers[lane] = scheduler
            return scheduler

    def close(self) -> None:
        """Stop the schedulers' threads (after the requests in flight); the engine cannot generate afterwards."""
        with self._lock:
            schedulers = [s for base in self._bases.values() for s in base.schedulers.values()]
            for base in self._bases.values():
                base.schedulers.clear()
        for scheduler in schedulers:
            scheduler.close()


def _forward_pass(base: _LoadedBase, lane: str | None):
    """The scheduler's model call for ``base``: one forward under the model lock, each row with its adapter.

    ``lane`` None: the rows mix the base and plain LoRA adapters (batched LoRA); otherwise every
    row uses the adapter ``lane`` and peft applies it itself.
    """

    def forward(input_ids, attention_mask, position_ids, cache, adapters: list[str | None]) -> torch.Tensor:
        with base.lock, torch.inference_mode():
            model = _unwrap(base.model)
            if lane is None:
                applied = base.lora.rows(adapters, input_ids.device)
            else:
                applied = base.lora.peft_adapter(base.model, lane)
            with applied, attention_kernels(input_ids.device):
                output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, use_cache=True, logits_to_keep=1)
        return output.logits[:, -1, :].float()

    return forward


def _unwrap(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _encode(tokenizer, text: str, *, special: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _decoder(tokenizer, eos_ids: list[int]):
    eos = set(eos_ids)

    def decode(ids: list[int]) -> str:
        while ids and ids[-1] in eos:
            ids = ids[:-1]
        return tokenizer.decode(ids, skip_special_tokens=True)

    return decode


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _tokenizer_and_eos(tokenizer_folder: Path, model_folder: Path) -> tuple[object, list[int]]:
    """The tokenizer (chat template + pad) and the ids that end an answer.

    The folder's generation config names the end-of-turn token training used; the
    template's own end-of-turn token and EOS are added in case it does not.
    """
    from tunesmith.models.loading import apply_chat_template_and_eos, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_folder)
    _, _, eos_ids = apply_chat_template_and_eos(tokenizer)
    ids = _generation_config_eos(model_folder) + [i for i in eos_ids if i is not None]
    return tokenizer, list(dict.fromkeys(ids))


def _generation_config_eos(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


def _weights_stamp(folder: Path) -> int:
    """Changes when the weights in ``folder`` are rewritten (a run trained again in place)."""
    stamps = [p.stat().st_mtime_ns for p in folder.glob("*.safetensors")]
    return max(stamps) if stamps else 0
