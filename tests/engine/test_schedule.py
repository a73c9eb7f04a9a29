"""Schedules that scale with the shot (backend/train/schedule.py): iterations from samples per pixel,
a time budget measured from the real step time, the plan in report.json and across a resume."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from backend.cli import _config, build_parser
from backend.config import preset
from backend.errors import ConfigError
from backend.progress import CancelToken
from backend.train import Trainer, load_checkpoint, read_meta
from backend.train import schedule as S

from .test_train import tiny_clip, tiny_config


def test_iterations_follow_samples_per_pixel_and_are_clamped():
    q = preset("quality")
    assert q.train.iterations == 0 and q.train.samples_per_pixel == 150
    tennis = S.initial_plan(q.train, q.losses, 448, 256, 70)
    assert tennis.derived and tennis.iterations == -(-150 * 448 * 256 * 70 // 40_000)  # 30,106
    assert tennis.samples_per_pixel == pytest.approx(150, rel=1e-3)
    big = S.initial_plan(q.train, q.losses, 1920, 1080, 50)
    assert big.iterations == q.train.max_iterations and big.capped_by == "max_iterations"
    tiny = S.initial_plan(q.train, q.losses, 64, 32, 4)
    assert tiny.iterations == q.train.min_iterations and tiny.capped_by == "min_iterations"
    # the loss stops stay at fast's number of samples while they fit in their share of the run
    assert (tennis.alpha_bootstrapping_stop, tennis.global_rigidity_stop) == (2_500, 1_250)
    assert (tiny.alpha_bootstrapping_stop, tiny.global_rigidity_stop) == (625, 313)
    # an explicit count without a budget is the seed's behaviour: nothing re-planned
    fast = preset("fast")
    plan = S.initial_plan(fast.train, fast.losses, 1920, 1080, 50)
    assert not plan.scheduled and plan.iterations == 8_000 and "train.iterations = 8,000" in plan.reason()


def test_budget_caps_iterations_and_stops_never_restart():
    assert S.budget_iterations(done=50, target=30_000, step_s=0.016, seconds_left=160.0) == 50 + 10_000
    assert S.budget_iterations(done=50, target=3_000, step_s=0.016, seconds_left=160.0) == 3_000
    assert S.budget_iterations(done=50, target=3_000, step_s=0.016, seconds_left=-5.0) == 50
    q = preset("quality")
    plan = S.initial_plan(q.train, q.losses, 448, 256, 70)
    S.with_iterations(plan, 4_000, q.losses, done=50)
    assert (plan.alpha_bootstrapping_stop, plan.global_rigidity_stop) == (1_250, 625)
    S.with_iterations(plan, 30_000, q.losses, done=1_000)  # bootstrapping still on; rigidity has stopped
    assert (plan.alpha_bootstrapping_stop, plan.global_rigidity_stop) == (2_500, 625)
    assert S.estimate_export_s(1920, 1080, 100, 2, "cuda") == pytest.approx(15.4, abs=0.1)


def test_cpu_export_estimate_follows_the_measured_step():
    # tennis at 256 x 70 frames, 2 layers: before the step is measured, the per-pixel constant
    static = S.estimate_export_s(256, 146, 70, 2, "cpu")
    assert S.estimate_export_s(256, 146, 70, 2, "cpu", None, 2048) == static
    quiet = S.estimate_export_s(256, 146, 70, 2, "cpu", 0.166, 2048)
    loaded = S.estimate_export_s(256, 146, 70, 2, "cpu", 6 * 0.166, 2048)
    assert 24.0 <= quiet <= 40.0  # a quiet 2-core machine exported this shot in 24 s
    assert loaded - 6.0 == pytest.approx(6 * (quiet - 6.0))  # the per-sample part scales with the step
    # the GPU estimate does not depend on the step (its export is bound by the frame writers)
    assert S.estimate_export_s(1920, 1080, 100, 2, "cuda", 0.0137, 40_000) == S.estimate_export_s(1920, 1080, 100, 2, "cuda")


@pytest.mark.parametrize("text,seconds", [("10m", 600), ("90s", 90), ("1h", 3600), ("1h30m", 5400),
                                          ("2.5m", 150), ("45", 45), ("0", 0), ("none", 0)])
def test_parse_budget(text, seconds):
    assert S.parse_budget(text) == seconds


def test_bad_budget_and_settings_are_clear_errors():
    for bad in ("10 minutes", "m", "-5m", "1x"):
        with pytest.raises(ConfigError, match="time budget"):
            S.parse_budget(bad)
    with pytest.raises(ConfigError, match="samples_per_pixel"):
        preset("seed").replace(train={"iterations": 0}).validate()
    with pytest.raises(ConfigError, match="max_frames"):
        preset("seed").replace(clip={"max_frames": 1}).validate()
    assert preset("seed").replace(clip={"max_frames": 0}).clip.max_frames == 0  # 0: no cap
    args = build_parser().parse_args(["decompose", "c", "--out", "o", "--preset", "fast", "--budget", "10m",
                                      "--spp", "40"])
    t = _config(args).train
    assert (t.budget_s, t.iterations, t.samples_per_pixel) == (600.0, 0, 40.0)


def _budget_config(budget_s, **train):
    t = {"iterations": 0, "samples_per_pixel": 200.0, "min_iterations": 20, "max_iterations": 40,
         "budget_s": budget_s, "checkpoint_every": 10, "lr_schedule": "cosine"}
    t.update(train)
    return tiny_config(**t)


def test_a_budget_too_short_stops_after_the_measurement():
    torch.set_num_threads(1)
    messages = []
    tr = Trainer(tiny_clip(), None, _budget_config(0.001), torch.device("cpu"),
                 progress=lambda p: messages.append(p.message))
    assert tr.plan.iterations == 40 and tr.horizon == 40  # 200 spp of 24x16x4 at 256 = 60: clamped
    tr.train()
    assert tr.state.iteration == 1  # the budget was spent before training began: one step, then stop
    assert tr.plan.capped_by == "budget" and tr.plan.final and tr.plan.step_ms > 0
    assert any(m.startswith("[schedule] re-planned") and "capped" in m for m in messages)


def test_the_chosen_plan_survives_resume(tmp_path):
    torch.set_num_threads(1)
    clip, token = tiny_clip(), CancelToken()
    cfg = _budget_config(3600.0)

    def stop_after_plan(p):
        if p.message.startswith("[schedule] re-planned"):
            token.cancel("test")

    first = Trainer(clip, None, cfg, torch.device("cpu"), progress=stop_after_plan, cancel=token)
    with pytest.raises(Exception, match="test"):
        first.train(checkpoint_dir=tmp_path / "ck")
    chosen = first.plan.to_dict()
    assert chosen["step_ms"] is not None and read_meta(tmp_path / "ck")["schedule"]["step_ms"] == chosen["step_ms"]
    second = Trainer(clip, None, cfg, torch.device("cpu"))
    assert second.plan.step_ms is None
    it = load_checkpoint(tmp_path / "ck", second)
    assert second.plan.final and second.plan.replans == chosen["replans"]
    assert (second.horizon, second.stops) == (first.horizon, first.stops)
    assert second.lr_factor(it + 5) == first.lr_factor(it + 5)
    second.train(checkpoint_dir=tmp_path / "ck")
    assert second.state.iteration == first.horizon and second.plan.replans == chosen["replans"]


def test_grids_from_the_shot_grow_with_the_frame_and_never_shrink():
    q = preset("quality")
    assert q.model.grids_from_shot and not preset("fast").model.grids_from_shot
    tex, xyt = q.model.texture_grid, q.model.xyt_grid
    assert (tex.log2_hashmap_size, xyt.log2_hashmap_size, xyt.per_level_scale) == (19, 19, 1.25)
    t, x, why = S.shot_grids(tex, xyt, 1920, 1080)  # 2.07 M pixels: 2^21; finest level 16 * s^15 = 960
    assert (t.log2_hashmap_size, x.log2_hashmap_size, x.per_level_scale) == (21, 21, 1.314)
    assert x.base_resolution * x.per_level_scale ** (x.n_levels - 1) == pytest.approx(960, rel=2e-3)
    assert t.per_level_scale == tex.per_level_scale and t.n_levels == tex.n_levels
    assert "2^21" in why and "1920x1080" in why
    for w, h in ((448, 256), (768, 432)):  # tennis, long edge 768: fast's grids
        t, x, why = S.shot_grids(tex, xyt, w, h)
        assert (t, x) == (tex, xyt) and "as configured" in why
    t, x, _ = S.shot_grids(tex, xyt, 1280, 720)  # 0.92 M pixels: 2^20; finest level 640
    assert (t.log2_hashmap_size, x.per_level_scale) == (20, pytest.approx((640 / 16) ** (1 / 15), abs=1e-3))
    t, x, _ = S.shot_grids(tex, xyt, 3840, 2160)  # 4K: the tables stop at 2^21
    assert t.log2_hashmap_size == x.log2_hashmap_size == S.MAX_SHOT_LOG2_TABLE
    big = replace(tex, log2_hashmap_size=22)
    assert S.shot_grids(big, replace(xyt, per_level_scale=1.5), 1920, 1080)[:2] == (
        big, replace(xyt, log2_hashmap_size=21, per_level_scale=1.5))


def test_a_trainer_with_grids_from_the_shot_builds_them_and_resumes_them(tmp_path):
    torch.set_num_threads(1)
    clip = tiny_clip(w=48, h=32)  # 1,536 pixels: tables of 2^11 where the config says 2^10
    cfg = tiny_config(iterations=4).replace(model={"grids_from_shot": True})
    messages = []
    tr = Trainer(clip, None, cfg, torch.device("cpu"), progress=lambda p: messages.append(p.message))
    assert cfg.model.texture_grid.log2_hashmap_size == 10  # the caller's config is left alone
    rep = tr.grids_report()
    assert rep["from_shot"] and rep["texture"]["log2_hashmap_size"] == rep["xyt"]["log2_hashmap_size"] == 11
    assert tr.model.textures[0].grid.cfg.log2_hashmap_size == 11
    assert tr.model.residuals[0].grid.cfg.log2_hashmap_size == 11
    tr.train(checkpoint_dir=tmp_path / "ck")
    assert any(m.startswith("[grids] grids from the shot (48x32)") for m in messages)
    again = Trainer(clip, None, cfg, torch.device("cpu"))
    assert load_checkpoint(tmp_path / "ck", again) == 4
    plain = Trainer(clip, None, tiny_config(iterations=4), torch.device("cpu"))
    with pytest.raises(Exception, match=r"\[model\] differs"):
        load_checkpoint(tmp_path / "ck", plain)


def test_decompose_reports_the_plan(tmp_path):
    from backend.pipeline import decompose
    from backend.synthetic import make_synthetic_clip
    torch.set_num_threads(2)
    scene = make_synthetic_clip(width=48, height=32, n_frames=4, seed=4)
    cfg = _budget_config(3600.0, checkpoint_every=50, min_iterations=16, max_iterations=16).replace(
        export={"atlas_size": 32, "write_videos": False, "maps": "none"}, clip={"max_frames": 0})
    out = decompose(scene.write(tmp_path / "clip"), tmp_path / "dec", cfg)
    rep = json.loads((out / "report.json").read_text())
    sch = rep["schedule"]
    assert sch["derived"] and sch["budget_s"] == 3600.0 and sch["step_ms"] > 0 and sch["replans"]
    assert rep["iterations"] == sch["iterations"] == 16 and sch["samples_per_pixel"] == pytest.approx(16 * 256 / 6144, abs=1e-3)
    assert "samples/pixel" in sch["reason"] and "budget" in sch["reason"]
    assert rep["training_memory"]["host"]["peak_vmrss_gb"] > 0
    assert rep["grids"] == {"from_shot": False, "texture": rep["config"]["model"]["texture_grid"],
                            "xyt": rep["config"]["model"]["xyt_grid"], "reason": "grids as configured"}
