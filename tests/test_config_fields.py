"""Every config field is read by code: a known key that silently does nothing is worse than an unknown-key error.

A field counts as read when ``pae_fast/`` or ``kernels/`` (outside the config modules, except the load-time
conversions of ``Config.finalize``) names it as an attribute (``.field``), a string (``"field"``) or a keyword
(``field=``).
"""

import ast
import dataclasses
import functools
import re
import typing
from pathlib import Path

import pytest

from pae_fast.config import Config, DataConfig, GeneratorConfig

ROOT = Path(__file__).resolve().parents[1]
# config_checks.py names every numeric key in its range table: naming a key there is not reading it
CONFIG_MODULES = {ROOT / "pae_fast" / f for f in ("config.py", "config_io.py", "config_checks.py")}

# Tokenizer / prior-refinement fields whose stages are being written (pae_fast/stages/train_tokenizer.py,
# refine_priors.py); the lead empties this set when those stages merge. Nothing else may be listed here.
PENDING = {
    "tokenizer.decoder", "tokenizer.lambda_l1", "tokenizer.lambda_lpips",
    "tokenizer.lambda_gan", "tokenizer.lambda_ssr", "tokenizer.lambda_mcr", "tokenizer.lambda_scr",
    "tokenizer.mcr_angles", "tokenizer.mcr_mode", "tokenizer.noise_aug_tau", "tokenizer.noise_aug_dist",
    "tokenizer.gan_start_step", "tokenizer.disc_start_step", "tokenizer.adaptive_weight_max",
    "tokenizer.lpips_weights", "tokenizer.checkpoint", "tokenizer.latent_channels",
    "refine.latent_dim", "refine.reconstructor_depth", "refine.reconstructor_hidden", "refine.lambda_rep",
    "refine.lambda_gram", "refine.lowpass_strength", "refine.upsampler",
}  # fmt: skip


def _fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """``(dotted key, field name)`` of every leaf field of a config dataclass, recursively."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields(hints[f.name], key + ".")
        else:
            out.append((key, f.name))
    return out


def _finalize_source() -> str:
    """The source of ``Config.finalize`` (conversions at load read fields too, e.g. ``flow.rae_alpha``)."""
    text = (ROOT / "pae_fast" / "config.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef) and node.name == "finalize":
            return ast.get_source_segment(text, node) or ""
    return ""


@functools.cache
def _source() -> str:
    files = [p for d in ("pae_fast", "kernels") for p in sorted((ROOT / d).rglob("*.py")) if p not in CONFIG_MODULES]
    return "\n".join([_finalize_source(), *(p.read_text(encoding="utf-8") for p in files)])


def _is_read(name: str, source: str) -> bool:
    return re.search(rf"(\.{name}\b|[\"']{name}[\"']|\b{name}=)", source) is not None


def test_every_config_field_is_read_by_code():
    source = _source()
    unread = [key for key, name in _fields(Config) if key not in PENDING and not _is_read(name, source)]
    assert not unread, f"config fields nothing reads (wire them or remove them): {unread}"


def test_pending_lists_only_tokenizer_and_refine_fields_that_nothing_reads_yet():
    keys = dict(_fields(Config))
    assert all(k in keys and k.split(".")[0] in ("tokenizer", "refine") for k in PENDING), PENDING
    source = _source()
    already_read = sorted(k for k in PENDING if _is_read(keys[k], source))
    # a pending field that code now reads must leave PENDING (checked by name, so a field sharing a name with
    # another section's field, e.g. ``checkpoint``, stays listed until its own stage reads it)
    ambiguous = {name for key, name in _fields(Config) if key not in PENDING}
    assert [k for k in already_read if keys[k] not in ambiguous] == []


def test_the_check_fails_on_a_field_nothing_reads():
    assert not _is_read("a_field_nothing_reads_xyz", _source())
    assert _is_read("num_workers", _source())


@pytest.mark.parametrize("cls", [DataConfig, GeneratorConfig])
def test_field_walk_covers_sections(cls):
    assert {n for _, n in _fields(cls)} == {f.name for f in dataclasses.fields(cls)}
