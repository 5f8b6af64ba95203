"""Generated bad input for functions declared with :func:`toymodels._validate.validate`.

Each test module lists, for every registered public function of its package, one valid call
(``EXAMPLES``: qualified name -> function returning ``(args, kwargs)``); :func:`bad_calls` then
replaces one declared argument at a time by each value its constraint must refuse, and
:func:`check_refused` asserts that the call raises ``TypeError`` or ``ValueError`` whose message
names the argument in the common format ("`name` must be ...").
"""

from __future__ import annotations

import inspect

import pytest


def bad_calls(registry: dict, examples: dict, prefix: str):
    """``pytest.param`` entries ``(qualname, arg, bad_value)`` for every registered function
    whose name starts with ``prefix``; a registered function without an example is itself a
    failing entry, so a new public function cannot escape the generated tests."""
    params = []
    for qualname, func in sorted(registry.items()):
        if not qualname.startswith(prefix):
            continue
        if qualname not in examples:
            params.append(pytest.param(qualname, None, None, id=f"{qualname}-missing-example"))
            continue
        for arg, constraint in func.__constraints__.items():
            for i, bad in enumerate(constraint.bad_values()):
                params.append(pytest.param(qualname, arg, bad, id=f"{qualname}-{arg}-{i}"))
    return params


def check_refused(registry: dict, examples: dict, qualname: str, arg, bad):
    assert qualname in examples, f"{qualname} is registered with @validate but has no example call"
    func = registry[qualname]
    args, kwargs = examples[qualname]()
    bound = inspect.signature(func).bind_partial(*args, **kwargs)
    bound.arguments[arg] = bad
    with pytest.raises((TypeError, ValueError)) as info:
        func(*bound.args, **bound.kwargs)
    assert f"`{arg}` must be" in str(info.value), f"message does not name `{arg}`: {info.value}"


def check_example_runs(registry: dict, examples: dict, qualname: str):
    """The example call itself must pass validation (else every generated case passes vacuously)."""
    func = registry[qualname]
    args, kwargs = examples[qualname]()
    func(*args, **kwargs)
