"""The pydantic base of clearance's input models: frozen, strict about extras, and raising
:class:`InvalidRequest` instead of pydantic's ``ValidationError`` so callers catch one error tree."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from clearance.errors import InvalidRequest


class InvalidModel(InvalidRequest):
    """An input model was constructed with bad values; ``.errors`` has pydantic's details."""

    def __init__(self, model: str, error: ValidationError) -> None:
        details = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or model}: {e['msg']}" for e in error.errors()[:5])
        super().__init__(f"invalid {model}: {details}")
        self.errors = error.errors()


class InputModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=False)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise InvalidModel(type(self).__name__, error) from None
