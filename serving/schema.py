"""Request/response models of the HTTP API (pydantic: the only place it is used).

The limits are part of the schema (and so of the OpenAPI spec): :func:`make_schemas`
builds the models for a given :class:`ApiLimits`.

A predict request is a batch of examples, each exactly the issue's shape::

    {"examples": [{"features": {"user": [12], "item": [7, 9]}, "dense": [0.5, 1.0]}]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from monolith_py.errors import ConfigError

__all__ = ["ApiLimits", "make_schemas", "PredictResponse", "ModelInfo", "Health", "ErrorBody"]


@dataclass(frozen=True)
class ApiLimits:
    """Bounds on what one request may carry.

    Args:
        max_examples: examples per predict request.
        max_ids_per_feature: ids of one feature in one example.
        max_features: features named in one example.
        max_dense: dense values of one example.
        max_body_bytes: request body size (checked before the body is read).
    """

    max_examples: int = 1024
    max_ids_per_feature: int = 4096
    max_features: int = 256
    max_dense: int = 4096
    max_body_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        for name in ("max_examples", "max_ids_per_feature", "max_features", "max_dense",
                     "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ApiLimits.{name} must be a positive int, got {v!r}")


FeatureName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Int64 = Annotated[int, Field(strict=True, ge=-(2**63) + 1, le=2**63 - 1)]


def make_schemas(limits: ApiLimits) -> tuple[type[BaseModel], type[BaseModel]]:
    """``(Example, PredictRequest)`` models enforcing ``limits``."""

    class Example(BaseModel):
        """One example: ids per sparse feature (missing features are empty) and the dense
        features (exactly the model's ``num_dense`` values)."""

        model_config = ConfigDict(extra="forbid")
        features: Annotated[
            dict[FeatureName, Annotated[list[Int64], Field(max_length=limits.max_ids_per_feature)]],
            Field(max_length=limits.max_features),
        ] = Field(default_factory=dict)
        dense: Annotated[
            list[Annotated[float, Field(allow_inf_nan=False)]],
            Field(max_length=limits.max_dense),
        ] = Field(default_factory=list)

    class PredictRequest(BaseModel):
        """A batch of examples to score."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{"examples": [
                {"features": {"user": [12], "item": [7, 9]}, "dense": [0.5, 1.0]}]}]})
        examples: Annotated[list[Example], Field(min_length=1, max_length=limits.max_examples)]

    return Example, PredictRequest


class PredictResponse(BaseModel):
    """One score (the predicted probability, sigmoid of the logit) per example, and the
    model version that produced them (dense version and each shard's epoch and versions)."""

    scores: list[float]
    model_version: str


class ShardInfo(BaseModel):
    shard: int
    epoch: int | None
    versions: dict[str, int]
    last_sync_s_ago: float | None


class TableInfo(BaseModel):
    size: int
    dim: int
    dtype: str
    memory_bytes: int


class LoadedModel(BaseModel):
    kind: str
    num_dense: int
    features: list[str]
    dense_epoch: int | None
    dense_version: int | None
    loaded_s_ago: float


class ModelInfo(BaseModel):
    """What the worker serves: versions, last sync per shard, table sizes."""

    ready: bool
    version: str
    model: LoadedModel | None
    shards: list[ShardInfo]
    tables: dict[str, TableInfo]


class Health(BaseModel):
    status: str
    detail: str = ""


class ErrorBody(BaseModel):
    """Every error: a message saying what was wrong and how to fix it (validation errors
    carry pydantic's list of problems)."""

    detail: Any


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorBody, "description": "Body larger than the configured limit."},
    422: {"model": ErrorBody, "description": "Invalid body (schema, unknown feature, "
                                             "dense width, limits)."},
    503: {"model": ErrorBody, "description": "No model loaded yet, or overloaded."},
    504: {"model": ErrorBody, "description": "The model did not answer in time."},
}
