"""`--set SECTION.FIELD=VALUE`: one configuration field from the command line, after the preset,
a --config file and the named options; typed like the TOML file, refused clearly when wrong."""

from __future__ import annotations

import pytest

from backend.cli import _config, build_parser
from backend.config import preset
from backend.errors import ConfigError


def _cfg(*argv):
    return _config(build_parser().parse_args(["decompose", "CLIP", "--out", "OUT", *argv]))


def test_set_changes_fields_of_any_type_after_the_preset():
    cfg = _cfg("--preset", "fast", "--set", "losses.optical_flow=0.01", "--set", "train.batch_size=20000",
               "--set", "train.tf32=false", "--set", "losses.rigidity_stencil=shared",
               "--set", "model.texture_grid.log2_hashmap_size=20")
    fast = preset("fast")
    assert fast.losses.optical_flow == 0.05 and cfg.losses.optical_flow == 0.01
    assert cfg.train.batch_size == 20000 and isinstance(cfg.train.batch_size, int)
    assert cfg.train.tf32 is False and fast.train.tf32 is True
    assert cfg.losses.rigidity_stencil == "shared"
    assert cfg.model.texture_grid.log2_hashmap_size == 20
    # everything else is the preset's
    assert cfg.train.iterations == fast.train.iterations and cfg.model.texture_grid.per_level_scale == 1.38
    assert cfg.preset == "fast"


def test_set_wins_over_the_named_options_and_the_last_one_wins(tmp_path):
    toml = tmp_path / "shot.toml"
    toml.write_text('preset = "fast"\n[losses]\noptical_flow = 0.02\n', encoding="utf-8")
    cfg = _cfg("--config", str(toml), "--iterations", "500", "--set", "train.iterations=700",
               "--set", "losses.optical_flow=0.03", "--set", "losses.optical_flow=0.04")
    assert cfg.train.iterations == 700 and cfg.losses.optical_flow == 0.04
    # a quoted TOML string works as well as a bare one
    assert _cfg("--set", 'losses.rigidity_stencil="shared"').losses.rigidity_stencil == "shared"


@pytest.mark.parametrize("item, words", [
    ("losses.optical_flow", "SECTION.FIELD=VALUE"),
    ("optical_flow=0.05", "SECTION.FIELD=VALUE"),
    ("losses..x=1", "SECTION.FIELD=VALUE"),
    ("losses.optical_flo=0.05", "unknown config field losses.optical_flo"),
    ("lossess.optical_flow=0.05", "unknown config section"),
    ("train.batch_size=big", "must be an integer"),
    ("train.tf32=1", "must be true or false"),
    ("losses.rigidity_stencil=sideways", "backward|shared"),  # validated like the TOML file
    ("model.texture_grid=3", "must be a table"),
])
def test_a_wrong_setting_is_a_clear_config_error(item, words):
    with pytest.raises(ConfigError, match=words.replace("|", r"\|").replace(".", r"\.")):
        _cfg("--preset", "fast", "--set", item)


def test_set_is_accepted_by_the_other_training_commands():
    for argv in (["demo", "--out", "D", "--set", "losses.optical_flow=0.02"],):
        cfg = _config(build_parser().parse_args(argv))
        assert cfg.losses.optical_flow == 0.02 and cfg.preset == "demo"
