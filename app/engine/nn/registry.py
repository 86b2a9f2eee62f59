"""One registry of network kinds: checkpoints rebuild their network from ``config["kind"]``.

A network class stores its constructor arguments as ``self.config`` (with ``"kind"``); a checkpoint
saves that config and the state dict, and :func:`build_network` rebuilds the module from it. Kinds
map to ``"module:Class"`` strings and are imported on first use, so a new paradigm's network module
is one line here (or one :func:`register_network` call) and nothing is imported before it is needed.
"""
from __future__ import annotations

import importlib

import torch.nn as nn

NETWORKS: dict[str, str] = {
    "deformable": "app.engine.nn.networks:DeformableNet",
    "affine": "app.engine.nn.networks:AffineNet",
    "affine_flow": "app.engine.nn.networks:FlowAffineNet",
    "two_stage": "app.engine.nn.networks:TwoStageNet",
    "refine": "app.engine.nn.networks:RefineNet",
    "agent": "app.engine.nn.agent_net:AgentNet",
    "pose_regressor": "app.engine.nn.regression:PoseRegressor",
    "supervised": "app.engine.nn.regression:SupervisedNet",
    "dsm": "app.engine.nn.dsm_net:DsmNet",
}


def register_network(kind: str, target: str) -> None:
    """Add a network kind (``target`` = ``"module:Class"``); re-registering the same target is a no-op."""
    if kind in NETWORKS and NETWORKS[kind] != target:
        raise ValueError(f"network kind '{kind}' is already registered as {NETWORKS[kind]}")
    NETWORKS[kind] = target


def network_class(kind: str) -> type:
    """The class registered for ``kind`` (ValueError naming the known kinds when unknown)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; kinds: {', '.join(NETWORKS)}")
    mod, cls = NETWORKS[kind].split(":")
    return getattr(importlib.import_module(mod), cls)


def build_network(config: dict) -> nn.Module:
    """Rebuild a network from its ``config`` (``model.config``); raises ValueError if unknown or unfit."""
    if not isinstance(config, dict) or "kind" not in config:
        raise ValueError(f"unknown network config {config!r}; kinds: {', '.join(NETWORKS)}")
    cls = network_class(config["kind"])
    kw = {k: v for k, v in config.items() if k != "kind"}
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"network config {config!r} does not fit {config['kind']}: {e}") from None


def check_kind(config: dict, accepted: tuple[str, ...], what: str) -> None:
    """Raise ValueError when ``config``'s kind is not one of ``accepted`` (``what`` names the user)."""
    kind = config.get("kind") if isinstance(config, dict) else None
    if accepted and kind not in accepted:
        raise ValueError(f"{what} holds a '{kind}' network; it needs {' or '.join(repr(k) for k in accepted)}")
