"""The base of every spec section, and the error a spec that cannot run raises."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class SpecError(ValueError):
    """A spec that cannot run. ``problems`` holds ``(field_path, message)`` pairs."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {msg}" for path, msg in problems))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
