"""Every registered paradigm honours the interface: Params, description, initial=; learned ones declare
a TrainConfig (a LoopConfig), a Trainer and the network kinds they accept."""
import dataclasses
import inspect

import pytest

from app.engine import paradigms
from app.engine.training.config import LoopConfig


@pytest.mark.parametrize("key", paradigms.available())
def test_paradigm_declares_the_interface(key):
    cls = paradigms.registrar_class(key)
    assert cls.key == key and paradigms.description(key)
    assert dataclasses.is_dataclass(cls.Params)
    sig = inspect.signature(cls.register)
    for name in ("fixed_labels", "moving_labels", "fixed_points", "moving_points", "checkpoint", "initial",
                 "progress", "cancel", "device"):
        assert name in sig.parameters, f"{key}.register lacks {name}="
    if getattr(cls, "trainer", None):
        from app.engine.nn.registry import NETWORKS
        from app.engine.training.loop import Trainer, trainer_class
        assert issubclass(cls.TrainConfig, LoopConfig) and dataclasses.is_dataclass(cls.TrainConfig)
        assert issubclass(trainer_class(key), Trainer)
        assert cls.network_kinds and set(cls.network_kinds) <= set(NETWORKS)
        assert cls.learned


def test_trainable_paradigms_are_the_learned_ones_with_a_trainer():
    trainable = paradigms.trainable()
    assert {"unsupervised", "weakly"} <= set(trainable)
    assert "iterative" not in trainable and "instance" not in trainable
