"""Object masks: assignment, association of crossing objects, detectors' plumbing, errors, CLI.

Association and writing run without torchvision (a stand-in detector replays known
instances). torchvision's Mask R-CNN runs with random weights (no download) where
torchvision imports (scripts/test_vision); detectron2 is replaced by a stand-in module
that records what the predictor was given.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import types

import cv2
import numpy as np
import pytest

from backend.clip import Clip, load_clip
from backend.errors import ClipError, ConfigError, OutputError
from backend.preprocess.associate import Instance, linear_sum_assignment
from backend.preprocess.detect import COCO_BY_ID, COCO_CLASSES, check_classes, make_detector
from backend.preprocess.masks import attach_masks, detect_masks, write_masks
from backend.preprocess.vision import VisionUnavailable, WeightsUnavailable


def torchvision_or_skip():
    from backend.preprocess.vision import import_torchvision
    try:
        return import_torchvision()
    except VisionUnavailable as e:
        if os.environ.get("NEURAL_ATLAS_REQUIRE_TORCHVISION") == "1":
            raise
        pytest.skip(f"torchvision unavailable ({e}); scripts/test_vision runs these")


# ------------------------------------------------------------ assignment
@pytest.mark.parametrize("shape", [(4, 4), (3, 5), (5, 3), (1, 4), (6, 6)])
def test_assignment_matches_brute_force(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(20):
        cost = rng.random(shape).round(2)
        rows, cols = linear_sum_assignment(cost)
        n, m = shape
        assert len(rows) == min(n, m) and len(set(cols)) == len(cols)
        if n <= m:
            best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = min(sum(cost[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert cost[rows, cols].sum() == pytest.approx(best)


# ---------------------------------------------------- crossing objects
W, H, F = 96, 64, 14


def disc(cx, cy, r):
    ys, xs = np.mgrid[0:H, 0:W]
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r


def crossing_truth():
    """Two discs crossing: A (r 11) left -> right, B (r 13, in front) right -> left."""
    a = np.stack([disc(12 + 5.5 * t, 30, 11) for t in range(F)])
    b = np.stack([disc(84 - 5.5 * t, 36, 13) for t in range(F)])
    return a & ~b, b  # A is hidden where B passes in front


class ReplayDetector:
    """Returns pre-made instances per frame, shuffled; counts frames it was shown."""

    name = "replay"

    def __init__(self, per_frame):
        self.per_frame, self.t = per_frame, 0

    def __call__(self, frames):
        out = self.per_frame[self.t:self.t + len(frames)]
        self.t += len(frames)
        return out


def test_crossing_objects_keep_identities_and_missing_frame_is_empty():
    a, b = crossing_truth()
    rng = np.random.default_rng(0)
    per_frame = []
    for t in range(F):
        found = [Instance.from_mask(b[t], 0.95, "person")]
        if t != 8:  # A is not detected in frame 8
            found.append(Instance.from_mask(a[t], 0.9, "person"))
        if t == 3:  # a one-frame false positive
            found.append(Instance.from_mask(disc(48, 8, 4), 0.99, "person"))
        rng.shuffle(found)
        per_frame.append(found)
    clip = Clip(frames=np.zeros((F, H, W, 3), np.uint8), source="crossing")
    objects = detect_masks(clip, ReplayDetector(per_frame), ["person"], batch_size=3)
    assert objects.names == ["person_0", "person_1"] and objects.masks.shape == (F, H, W, 2)
    assert objects.frames_seen == [14, 13] and objects.info["tracks_found"] == 3
    got_b, got_a = objects.masks[..., 0], objects.masks[..., 1]  # B scores higher: first
    for t in range(F):
        np.testing.assert_array_equal(got_b[t], b[t])
        if t == 8:
            assert not got_a[t].any()  # empty, not B's mask
        else:
            np.testing.assert_array_equal(got_a[t], a[t])
    # --max-objects keeps the best
    one = detect_masks(clip, ReplayDetector(per_frame), ["person"], max_objects=1)
    assert one.names == ["person_0"] and one.masks.shape[-1] == 1
    np.testing.assert_array_equal(one.masks[..., 0], b)


def test_labels_are_not_mixed_and_names_sort_as_layers():
    a, b = crossing_truth()
    per_frame = [[Instance.from_mask(a[t], 0.9, "dog"), Instance.from_mask(b[t], 0.8, "sports ball")]
                 for t in range(F)]
    clip = Clip(frames=np.zeros((F, H, W, 3), np.uint8), source="two classes")
    objects = detect_masks(clip, ReplayDetector(per_frame), ["anything"])
    assert objects.names == ["dog_0", "sports_ball_0"] and objects.labels == ["dog", "sports ball"]
    attach_masks(clip, objects)
    assert clip.mask_names == ["dog_0", "sports_ball_0"] and clip.masks.shape == (F, H, W, 2)
    assert clip.masks.dtype == np.float32 and clip.mask_data.dtype == bool


def test_written_masks_load_back(tmp_path):
    a, b = crossing_truth()
    per_frame = [[Instance.from_mask(a[t], 0.9, "person")] for t in range(F)]
    frames_dir = tmp_path / "shot"
    frames_dir.mkdir()
    for t in range(F):
        cv2.imwrite(str(frames_dir / f"{t:05d}.png"), np.full((H, W, 3), 10 * t, np.uint8))
    clip = load_clip(frames_dir)
    objects = detect_masks(clip, ReplayDetector(per_frame), ["person"])
    folders = write_masks(objects, tmp_path / "masks", clip.frame_names)
    assert [f.name for f in folders] == ["person_0"]
    back = load_clip(frames_dir, masks=folders)
    np.testing.assert_array_equal(back.mask_data[..., 0], a)
    with pytest.raises(OutputError, match="already holds masks"):
        write_masks(objects, tmp_path / "masks", clip.frame_names)
    # a sub-range is written for every source frame, empty outside it
    part = load_clip(frames_dir, frame_range=(4, 10))
    objs = detect_masks(part, ReplayDetector(per_frame[4:10]), ["person"])
    folders = write_masks(objs, tmp_path / "ranged", part.frame_names, total_frames=F, first_frame=4)
    whole = load_clip(frames_dir, masks=folders)
    assert not whole.mask_data[:4].any() and not whole.mask_data[10:].any()
    np.testing.assert_array_equal(whole.mask_data[4:10, ..., 0], a[4:10])


# ------------------------------------------------------------- errors
def test_unknown_class_names_are_explained():
    assert check_classes(["Person", "sports_ball", "anything"]) == ["person", "sports ball", "anything"]
    with pytest.raises(ConfigError, match="unknown class 'persn'.*did you mean 'person'"):
        check_classes(["persn"])
    with pytest.raises(ConfigError, match="unknown class 'unicorn'"):
        make_detector("torchvision", ["unicorn"])
    with pytest.raises(ConfigError, match="unknown detector"):
        make_detector("yolo", ["person"])
    assert len(COCO_CLASSES) == 80 and len(COCO_BY_ID) == 91


def test_unreadable_mask_file_is_named(png_clip, tmp_path):
    folder = png_clip(n=3)
    mdir = tmp_path / "ball"
    mdir.mkdir()
    for i in range(3):
        cv2.imwrite(str(mdir / f"{i:05d}.png"), np.full((16, 24), 255, np.uint8))
    (mdir / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ClipError, match=r"mask of object 'ball'.*00001.png.*corrupt"):
        load_clip(folder, masks=[mdir])


def test_user_masks_of_any_size_are_resized_nearest(png_clip, tmp_path):
    folder = png_clip(n=2, width=24, height=16)
    for name, (w, h) in {"big": (97, 61), "small": (7, 5)}.items():
        mdir = tmp_path / name
        mdir.mkdir()
        for i in range(2):
            m = np.zeros((h, w), np.uint8)
            m[: h // 2] = 255
            cv2.imwrite(str(mdir / f"{i}.png"), m)
    clip = load_clip(folder, masks=[tmp_path / "big", tmp_path / "small"])
    assert clip.mask_names == ["big", "small"] and clip.mask_data.dtype == bool
    assert set(np.unique(clip.masks)) == {0.0, 1.0}
    assert clip.mask_data[0, 0].all() and not clip.mask_data[0, -1].any()


def test_missing_detector_weights_and_cli_exit(tmp_path, monkeypatch, png_clip):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.delenv("NEURAL_ATLAS_DOWNLOAD_WEIGHTS", raising=False)
    from backend.preprocess.cli import add_commands
    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["masks", str(png_clip(n=3)), "--class", "person", "--out", str(tmp_path / "m")])
    # without torchvision or without its weights: a ConfigError (exit 2 in backend/cli.py)
    with pytest.raises(ConfigError, match="torchvision is not installed|weights not found"):
        args.func(args)
    with pytest.raises(SystemExit):
        ap.parse_args(["masks", "x", "--detector", "yolo"])


# ------------------------------------------------- torchvision Mask R-CNN
def test_torchvision_categories_match_ours():
    tv = torchvision_or_skip()
    meta = tv.models.detection.MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT.meta["categories"]
    assert [None if c in ("__background__", "N/A") else c for c in meta] == list(COCO_BY_ID)


def test_torchvision_maskrcnn_random_weights_end_to_end(tmp_path, monkeypatch):
    torchvision_or_skip()
    # tiny settings: random weights on a 2-core CPU take seconds per image even so
    import torch
    torch.manual_seed(0)  # random weights: make them the same in every run
    det = make_detector("torchvision", ["anything"], weights=None, device="cpu", score_threshold=0.0,
                        mask_threshold=0.0, min_size=64, max_size=96, rpn_post_nms_top_n_test=50,
                        box_detections_per_img=5)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 60, 90, 3), dtype=np.uint8)
    seen = []

    def recording(batch):
        found = det(batch)
        seen.extend(found)
        return found

    clip = Clip(frames=frames, source="random")
    objects = detect_masks(clip, recording, ["anything"], max_objects=3, min_presence=0.0, batch_size=2)
    assert len(seen) == 2 and sum(len(f) for f in seen) > 0
    for inst in itertools.chain(*seen):
        x0, y0, x1, y1 = inst.box
        assert 0 <= x0 < x1 <= 90 and 0 <= y0 < y1 <= 60 and inst.crop.shape == (y1 - y0, x1 - x0)
        assert inst.label in COCO_CLASSES and 0.0 <= inst.score <= 1.0
    assert objects.masks.shape[:3] == (2, 60, 90) and objects.masks.shape[-1] <= 3
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    with pytest.raises(WeightsUnavailable, match="maskrcnn_resnet50_fpn_v2_coco.*--detector-weights"):
        make_detector("torchvision", ["person"])


def test_class_filter():
    from backend.preprocess.detect import _instances
    m = np.zeros((3, 8, 8), bool)
    m[:, 2:4, 2:4] = True
    kept = _instances(m, np.array([0.9, 0.8, 0.7]), ["person", "car", None], ["person"])
    assert [i.label for i in kept] == ["person"]
    assert len(_instances(m, np.ones(3), ["person", "car", None], ["anything"])) == 2


# ----------------------------------------------------------- detectron2
@pytest.fixture
def fake_detectron2(monkeypatch, tmp_path):
    """A stand-in detectron2 whose predictor records its input and finds one 'person' box."""
    seen = {}

    class Cfg(types.SimpleNamespace):
        def merge_from_file(self, path):
            seen["config"] = path

    def get_cfg():
        return Cfg(MODEL=types.SimpleNamespace(WEIGHTS="", DEVICE="", ROI_HEADS=types.SimpleNamespace()),
                   INPUT=types.SimpleNamespace(FORMAT="BGR"))

    class Instances:
        def __init__(self, h, w):
            m = np.zeros((2, h, w), bool)
            m[0, 2:6, 3:9] = True
            m[1, 1:3, 1:3] = True
            self.pred_masks, self.scores = m, np.array([0.9, 0.8])
            self.pred_classes = np.array([0, 2])  # person, car (contiguous ids)

        def to(self, device):
            return self

    class DefaultPredictor:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        def __call__(self, image):
            seen.setdefault("images", []).append(image.copy())
            return {"instances": Instances(*image.shape[:2])}

    weights = tmp_path / "model_final.pkl"
    weights.write_bytes(b"weights")
    mods = {"detectron2": types.ModuleType("detectron2"),
            "detectron2.model_zoo": types.SimpleNamespace(
                get_config_file=lambda name: f"/zoo/{name}",
                get_checkpoint_url=lambda name: "https://example.invalid/detectron2/x/model_final.pkl"),
            "detectron2.config": types.SimpleNamespace(get_cfg=get_cfg),
            "detectron2.engine": types.SimpleNamespace(DefaultPredictor=DefaultPredictor)}
    mods["detectron2"].model_zoo = mods["detectron2.model_zoo"]
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    return seen, weights


def test_detectron2_gets_bgr_and_its_classes(fake_detectron2, tmp_path, monkeypatch):
    seen, weights = fake_detectron2
    det = make_detector("detectron2", ["person"], weights=weights, device="cpu", score_threshold=0.7)
    assert seen["cfg"].MODEL.WEIGHTS == str(weights) and seen["cfg"].MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.7
    rgb = np.zeros((2, 8, 12, 3), np.uint8)
    rgb[..., 0] = 200  # red
    found = det(rgb)
    assert seen["images"][0][0, 0].tolist() == [0, 0, 200]  # handed over as BGR
    assert [[i.label for i in f] for f in found] == [["person"], ["person"]]
    assert found[0][0].box == (3, 2, 9, 6)
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "iopath"))
    with pytest.raises(WeightsUnavailable, match="iopath.*x/model_final.pkl.*--detector-weights"):
        make_detector("detectron2", ["person"])


def test_detectron2_missing_is_explained(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)
    with pytest.raises(VisionUnavailable, match="detectron2 is not importable.*--detector torchvision"):
        make_detector("detectron2", ["person"])


def test_masks_cli_json_with_stand_in(monkeypatch, tmp_path, capsys):
    a, _ = crossing_truth()
    root = tmp_path / "seed"
    (root / "video_frames").mkdir(parents=True)
    for t in range(F):
        cv2.imwrite(str(root / "video_frames" / f"{t:05d}.png"), np.zeros((H, W, 3), np.uint8))
    per_frame = [[Instance.from_mask(a[t], 0.9, "person")] for t in range(F)]
    import backend.preprocess.masks as masks_mod
    monkeypatch.setattr(masks_mod, "make_detector", lambda *a, **k: ReplayDetector(per_frame))
    from backend.preprocess.cli import add_commands
    ap = argparse.ArgumentParser()
    add_commands(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["masks", str(root), "--class", "person", "--quiet"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["objects"] == ["person_0"] and out["out"] == str(root / "masks")
    clip = load_clip(root)  # the seed layout now has masks/person_0
    assert clip.mask_names == ["person_0"]
    np.testing.assert_array_equal(clip.mask_data[..., 0], a)
