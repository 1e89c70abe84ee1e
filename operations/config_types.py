"""Value types shared by the configuration models (operations/config.py and the models of one
concern beside it, such as operations/monitoring_config.py): each a type with the rule that
says what is accepted (operations/rules.py)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from operations import rules


def _checked(rule):
    """An AfterValidator from a rules.* function returning what is expected, or None."""
    def validate(value):
        problem = rule(value)
        if problem:
            raise ValueError(problem)
        return value
    return AfterValidator(validate)


ImageRef = Annotated[str, _checked(rules.image_problem)]
ServicePort = Annotated[int, Field(ge=1, le=65535), _checked(rules.reserved_port_problem)]


def _home_or_absolute(value: str) -> str:
    if not (value.startswith("/") or value.startswith("~")):
        raise ValueError("an absolute path (or one starting with ~) on the control machine")
    return value


ControlPath = Annotated[str, AfterValidator(_home_or_absolute)]
