"""Fine-tuning jobs: the create request, tunesmith's extra settings, and the public objects."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.service.schemas.common import StrictRequest

Auto = Literal["auto"]


class Hyperparameters(StrictRequest):
    """OpenAI's hyperparameters, each a number or ``"auto"``."""

    n_epochs: Union[Auto, int, None] = None
    batch_size: Union[Auto, int, None] = None
    learning_rate_multiplier: Union[Auto, float, None] = None


class SupervisedMethod(StrictRequest):
    """``method.supervised``."""

    hyperparameters: Hyperparameters | None = None


class MethodCreate(StrictRequest):
    """OpenAI's ``method``: only ``supervised`` is trained by tunesmith."""

    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: SupervisedMethod | None = None
    dpo: dict[str, Any] | None = None
    reinforcement: dict[str, Any] | None = None


class TunesmithOptions(StrictRequest):
    """tunesmith's own settings; sent with ``extra_body={"tunesmith": {...}}`` or as top-level extra fields.

    Every field left out keeps the training layer's default.
    """

    method: str | None = Field(None, description="PEFT/full method: lora, dora, full")
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: Union[str, list[str], None] = None
    use_rslora: bool | None = None
    max_length: int | None = None
    drop_system: bool | None = None
    save_every_steps: int | None = None
    validation_split: float | None = None
    eval_every_steps: int | None = None
    gradient_accumulation_steps: int | None = None
    warmup_ratio: float | None = None
    schedule: str | None = None
    max_grad_norm: float | None = None
    precision: str | None = Field(None, description="auto, fp32 or bf16 (autocast)")


TUNESMITH_FIELDS = tuple(TunesmithOptions.model_fields)


class JobCreate(BaseModel):
    """``POST /v1/fine_tuning/jobs``."""

    model_config = ConfigDict(extra="allow")  # tunesmith options may ride at the top level

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = None
    # OpenAI's method object; a plain string ("lora", "dora", "full") is tunesmith's training method
    method: Union[MethodCreate, str, None] = None
    integrations: list[dict[str, Any]] | None = None
    tunesmith: TunesmithOptions | None = None


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    param: str | None = None


class JobPublic(BaseModel):
    """OpenAI's ``fine_tuning.job`` object, plus ``tunesmith`` (the extra settings used)."""

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: str
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = []
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None
    tunesmith: dict[str, Any] = {}


class EventPublic(BaseModel):
    """OpenAI's ``fine_tuning.job.event`` object."""

    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"


class CheckpointMetrics(BaseModel):
    """Metrics at a checkpoint's step."""

    step: float | None = None
    train_loss: float | None = None
    train_mean_token_accuracy: float | None = None
    valid_loss: float | None = None
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    full_valid_mean_token_accuracy: float | None = None


class CheckpointPublic(BaseModel):
    """OpenAI's ``fine_tuning.job.checkpoint`` object."""

    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: CheckpointMetrics
    step_number: int
