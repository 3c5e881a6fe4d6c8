"""infer layer: the generation engine used by chat, eval and the HTTP service.

>>> engine = Engine()
>>> engine.chat("smollm2-135m", [{"role": "user", "content": "Hi"}], GenerationSettings(max_tokens=20))
"""

from tunesmith.infer.engine import CompletionStream, Engine, ModelHandle
from tunesmith.infer.resolve import ModelSource, locate
from tunesmith.infer.types import Completion, GenerationSettings

__all__ = ["Completion", "CompletionStream", "Engine", "GenerationSettings", "ModelHandle", "ModelSource", "locate"]
