"""Registries: register/create, unknown names list the valid ones."""

import pytest

import pae_fast
from pae_fast.registry import Registry


def test_register_create_and_list():
    reg = Registry("widget")

    @reg.register("Small")
    def small(width=4):
        return ("small", width)

    reg.register("Large", lambda width=16: ("large", width))
    assert reg.names() == ["Large", "Small"]
    assert reg.create("Small", width=8) == ("small", 8)
    assert "Large" in reg


def test_unknown_name_lists_valid_and_suggests():
    reg = Registry("widget")
    reg.register("LightningDiT-XL/1", lambda: 1)
    reg.register("LightningDiT-B/1", lambda: 2)
    msg = r"unknown widget 'LightningDiT-XL/2'.*Did you mean.*Valid names: LightningDiT-B/1"
    with pytest.raises(KeyError, match=msg):
        reg.create("LightningDiT-XL/2")


def test_double_registration_is_an_error():
    reg = Registry("widget")
    reg.register("A", lambda: 1)
    with pytest.raises(KeyError, match="registered twice"):
        reg.register("A", lambda: 2)


def test_public_registry_functions():
    with pytest.raises(KeyError, match="unknown generator 'NoSuchModel'.*Valid names"):
        pae_fast.create_generator("NoSuchModel")
    with pytest.raises(KeyError, match="unknown tokenizer 'NoSuchTok'"):
        pae_fast.create_tokenizer("NoSuchTok")
    assert isinstance(pae_fast.list_generators(), list)
    assert isinstance(pae_fast.list_tokenizers(), list)
