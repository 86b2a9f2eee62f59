"""Registry of registration paradigms: key -> "module:Class", imported lazily.

Importing this package must stay cheap (the GUI lists paradigms at start-up without
importing torch).
"""
from __future__ import annotations

import importlib

from .base import (Registrar, format_number_list, make_params, param, parse_number_list,  # noqa: F401
                   parse_param_args, validate_params)

REGISTRY: dict[str, str] = {
    "iterative": "app.engine.paradigms.iterative:IterativeRegistrar",
    "unsupervised": "app.engine.paradigms.unsupervised:UnsupervisedRegistrar",
    "weakly": "app.engine.paradigms.weakly:WeaklyRegistrar",
    "instance": "app.engine.paradigms.instance:InstanceRegistrar",
    "agent": "app.engine.paradigms.agent:AgentRegistrar",
    "supervised": "app.engine.paradigms.supervised:SupervisedRegistrar",
    "dsm": "app.engine.paradigms.dsm:DsmRegistrar",
}

def available() -> list[str]:
    """Registered paradigm keys, in display order."""
    return list(REGISTRY)


def registrar_class(key: str) -> type:
    """The registrar class of ``key`` (imports its module on first use; paradigm modules import no
    torch at module level, so this stays cheap)."""
    if key not in REGISTRY:
        hint = " (a pipeline 'A+B' is run by app.engine.pipeline)" if "+" in str(key) else ""
        raise ValueError(f"unknown paradigm '{key}'{hint}; available: {', '.join(REGISTRY)}")
    mod, cls = REGISTRY[key].split(":")
    return getattr(importlib.import_module(mod), cls)


def get(key: str) -> Registrar:
    """Instantiate the registrar for ``key`` (imports its module on first use)."""
    return registrar_class(key)()


def description(key: str) -> str:
    """One line about paradigm ``key``: its class's ``description`` (the one source)."""
    return getattr(registrar_class(key), "description", "")


def trainable() -> list[str]:
    """Keys of the paradigms that have a trainer (``main.py train``)."""
    return [k for k in REGISTRY if getattr(registrar_class(k), "trainer", None)]


def register_paradigm(key: str, target: str) -> None:
    """Add a paradigm (``target`` = "module:Class")."""
    REGISTRY[key] = target
