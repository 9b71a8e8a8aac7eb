"""The scopes an API key or token may hold, and the names Xinference files use for them.

A user's ``permissions`` (Xinference's word) are read through :func:`expand`,
which turns every accepted name into the concrete scopes the server checks:

================== ==================================================================
``models:list``     list running models, describe one, registrations, engines, memory estimates
``models:read``     a launch's progress; and, as in Xinference ("use models"), all of ``inference``
``models:launch``   launch a model, cancel a launch
``models:terminate`` stop a model
``models:register`` register and unregister custom models
``inference``       chat, completions, embeddings, rerank, images, audio, files and batches
``cache:list``      list cached model files
``cache:delete``    delete cached model files
``admin``           everything, including the cluster's workers
================== ==================================================================

``cache:*`` is both cache scopes. Xinference's older names are accepted as
they are in its files: ``models:start`` (launch), ``models:stop``
(terminate), ``models:write`` (launch and terminate) and
``models:unregister`` (register).

Examples
--------
>>> sorted(expand(["models:read"]))
['inference', 'models:read']
>>> sorted(expand(["models:start", "cache:*"]))
['cache:delete', 'cache:list', 'models:launch']
>>> allows(expand(["admin"]), ("models:register",))
True
"""

from __future__ import annotations

from collections.abc import Iterable

#: The scopes the server checks, each with what it allows (README's scopes table).
SCOPES: dict[str, str] = {
    "models:list": "list running models, describe one, model registrations, engines, memory estimates",
    "models:read": "a launch's progress; and, as Xinference's models:read, everything inference allows",
    "models:launch": "launch a model, cancel a launch",
    "models:terminate": "stop a model",
    "models:register": "register and unregister custom models",
    "inference": "chat, completions, embeddings, rerank, images, audio, files and batches",
    "cache:list": "list cached model files",
    "cache:delete": "delete cached model files",
    "admin": "everything, including the cluster's workers",
}

#: Names accepted in a config file for a set of scopes (wildcards and Xinference's names).
ALIASES: dict[str, frozenset[str]] = {
    "cache:*": frozenset({"cache:list", "cache:delete"}),
    "models:start": frozenset({"models:launch"}),
    "models:stop": frozenset({"models:terminate"}),
    "models:write": frozenset({"models:launch", "models:terminate"}),
    "models:unregister": frozenset({"models:register"}),
}

#: Scopes that bring others with them. Why models:read brings inference: in Xinference it is the
#: permission "to use models", so a file written for Xinference keeps working unchanged.
IMPLIES: dict[str, frozenset[str]] = {
    "models:read": frozenset({"inference"}),
    "admin": frozenset(SCOPES),
}


class UnknownScopeError(ValueError):
    """A permission name that is neither a scope nor an accepted alias."""


def known_names() -> list[str]:
    """Every name a config file may use, sorted."""
    return sorted({*SCOPES, *ALIASES})


def expand(names: Iterable[str]) -> frozenset[str]:
    """The concrete scopes that ``names`` (scopes, aliases) grant; raises :class:`UnknownScopeError`."""
    out: set[str] = set()
    for name in names:
        if name in SCOPES:
            granted: Iterable[str] = (name,)
        elif name in ALIASES:
            granted = ALIASES[name]
        else:
            raise UnknownScopeError(f"unknown permission {name!r}; known: {', '.join(known_names())}")
        for scope in granted:
            out.add(scope)
            out.update(IMPLIES.get(scope, ()))
    return frozenset(out)


def allows(held: frozenset[str], needed: Iterable[str]) -> bool:
    """True if ``held`` (expanded scopes) includes any of ``needed``."""
    return any(scope in held for scope in needed)
