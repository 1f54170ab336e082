"""Each ablation preset differs from its table's base in exactly its row's switches (docs/method.md § Ablation
presets).

The one source of the mapping is each preset's first line, ``# row: table 2a, SSR / ...; base: <preset>; switches:
tokenizer.ssr, ...; gfid: <number> [tag]``; here the resolved configs are compared as flat dicts.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from pae_fast.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MAIN = "pae_tokenizer_dinov2l_d32"
ROW_PRESETS = sorted(p.stem for p in CONFIGS.glob("pae_tokenizer_abl_*.yaml")) + [MAIN]
# rows per table of the paper, as the issue and the secondary transcription list them (docs/method.md)
TABLE_ROWS = {"2a": 8, "2b": 2, "3a": 3, "3b": 4, "3c": 3, "7": 4, "8": 8}
HEADER = re.compile(r"^# row: (?P<rows>.+); base: (?P<base>\S+); switches: (?P<switches>.+); gfid: (?P<gfid>.+)$")


def header(name: str) -> dict:
    first = (CONFIGS / f"{name}.yaml").read_text().splitlines()[0]
    m = HEADER.match(first)
    assert m, f"{name}.yaml: first line is not an ablation header: {first!r}"
    rows = [r.strip() for r in m["rows"].split(" / ")]
    tables = [re.match(r"table (\w+), .+", r)[1] for r in rows]
    sw = m["switches"].strip()
    return {"rows": rows, "tables": tables, "base": m["base"], "gfid": m["gfid"].strip(),
            "switches": set() if sw == "none" else {s.strip() for s in sw.split(",")}}


def flat(name: str) -> dict:
    """The resolved config as ``{"section.key": value}``, ``out_dir`` left out (each run's own folder)."""
    d = dataclasses.asdict(load_config(CONFIGS / f"{name}.yaml"))
    d.pop("out_dir")
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("name", ROW_PRESETS)
def test_preset_differs_from_its_table_base_in_exactly_its_switches(name):
    h = header(name)
    row, base = flat(name), flat(h["base"])
    diff = {k for k in row if row[k] != base[k]}
    assert diff == h["switches"], f"{name} vs {h['base']}: {sorted(diff)} != {sorted(h['switches'])}"
    assert row["tokenizer.init_from_priors"] is True  # one initialisation policy, stated, for every row


def test_each_table_has_one_base_and_every_row():
    bases: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for name in ROW_PRESETS:
        h = header(name)
        for t in h["tables"]:
            bases.setdefault(t, set()).add(h["base"])
            count[t] = count.get(t, 0) + 1
        if not h["switches"]:
            assert h["base"] == name, f"{name}: a row without switches must be its table's base itself"
    assert count == TABLE_ROWS
    assert all(len(b) == 1 for b in bases.values()), bases
    assert bases["2a"] == bases["2b"] == {"pae_tokenizer_abl_t2a_all"}  # the 25-epoch ablation base [2nd]
    assert all(bases[t] == {MAIN} for t in ("3a", "3b", "3c", "7", "8"))  # the main recipe (1.80 rows)
    assert flat("pae_tokenizer_abl_t2a_all")["train.steps"] == 25 * 2502


def test_no_two_presets_are_the_same_run():
    seen: dict[str, str] = {}
    for name in ROW_PRESETS:
        key = repr(sorted(flat(name).items()))
        assert key not in seen, f"{name} and {seen.get(key)} resolve to the same config"
        seen[key] = name


def test_docs_table_lists_every_preset_with_its_published_number():
    text = (ROOT / "docs" / "method.md").read_text()
    section = text.split("### § Ablation presets", 1)[1].split("\n### ", 1)[0]
    for name in ROW_PRESETS:
        gfid = header(name)["gfid"].split()[0]
        lines = [ln for ln in section.splitlines() if ln.startswith(f"| `{name}`")]
        assert lines, f"docs/method.md § Ablation presets has no row for {name}"
        assert all(gfid in ln for ln in lines), (name, gfid, lines)
