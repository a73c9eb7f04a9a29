"""The SECTION.FIELD=VALUE setting form (neural_atlas.core.settings), shared by the backend's
--set and the panel's Overrides field."""

from __future__ import annotations

import pytest

from neural_atlas.core.settings import nested, parse_setting, settings_table


def test_parse_setting_types_values_as_toml_and_keeps_bare_words():
    assert parse_setting("losses.optical_flow=0.05") == (["losses", "optical_flow"], 0.05, "0.05")
    assert parse_setting(" train.tf32 = false ") == (["train", "tf32"], False, "false")
    assert parse_setting("losses.rigidity_stencil=shared") == (["losses", "rigidity_stencil"], "shared", "shared")
    assert parse_setting('losses.rigidity_stencil="shared"')[1] == "shared"
    assert parse_setting("model.texture_grid.log2_hashmap_size=20")[:2] == (
        ["model", "texture_grid", "log2_hashmap_size"], 20)


@pytest.mark.parametrize("bad", ["losses.optical_flow", "optical_flow=0.05", "losses..x=1", ".x=1", "=1"])
def test_parse_setting_refuses_what_is_not_the_form(bad):
    with pytest.raises(ValueError, match="SECTION.FIELD=VALUE"):
        parse_setting(bad)


def test_settings_table_nests_merges_and_lets_the_last_one_win():
    assert nested(["a", "b"], 1) == {"a": {"b": 1}}
    assert settings_table(["losses.optical_flow=0.01", "train.iterations=500", "losses.optical_flow=0.02",
                           "model.texture_grid.log2_hashmap_size=20"]) == {
        "losses": {"optical_flow": 0.02}, "train": {"iterations": 500},
        "model": {"texture_grid": {"log2_hashmap_size": 20}}}
    with pytest.raises(ValueError, match="inside a value"):
        settings_table(["train.iterations=5", "train.iterations.x=1"])
