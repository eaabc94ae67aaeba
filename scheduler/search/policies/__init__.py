"""The policy registry: a name (as `camelotctl set-policy` takes it) to the module implementing it.

Modules are imported lazily, on first use, so a policy with heavy dependencies costs nothing
until chosen. A policy module exposes either `create() -> Policy`, or a class defined in it whose
`name` attribute equals the registry name and whose constructor takes no arguments. Options
reach a policy through `PolicyInput.options`, so the same instance serves every re-plan.
"""

from __future__ import annotations

import importlib
import inspect

from common.errors import FailedPrecondition, InvalidArgument
from scheduler.policy import Policy

POLICIES: dict[str, str] = {
    "static": "scheduler.search.policies.static",
    "even": "scheduler.search.policies.even",
    "exclusive": "scheduler.search.policies.exclusive",
    "max-load": "scheduler.search.policies.maxload",
    "min-resource": "scheduler.search.policies.minresource",
    "feedback": "scheduler.search.policies.feedback",
}


def names() -> tuple[str, ...]:
    return tuple(POLICIES)


def get_policy(name: str) -> Policy:
    """A fresh instance of the named policy; INVALID_ARGUMENT for a name not in the registry."""
    module_name = POLICIES.get(name)
    if module_name is None:
        raise InvalidArgument(f"unknown policy {name!r}; known: {', '.join(POLICIES)}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:
            raise
        raise FailedPrecondition(f"policy {name!r} is not available in this build") from e
    create = getattr(module, "create", None)
    if callable(create):
        policy: Policy = create()
        return policy
    for _, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__ and getattr(cls, "name", None) == name:
            instance: Policy = cls()  # type: ignore[assignment]  # checked by the Protocol at use
            return instance
    raise FailedPrecondition(f"module {module_name} defines no policy named {name!r}")
