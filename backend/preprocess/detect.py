"""Instance-segmentation detectors: torchvision's Mask R-CNN (v2) and detectron2's, when importable.

A detector is called with a batch of uint8 RGB frames ``(B, H, W, 3)`` and returns, per
frame, a list of :class:`~backend.preprocess.associate.Instance` (bool mask crop, score,
COCO class name) for the classes asked for. Both are imported lazily; their weights follow
the rules of :mod:`backend.preprocess.vision` (torchvision's cache or an explicit path,
no download). Fixed against the seed: detectron2 gets the channel order its config asks
for (BGR for the model zoo, where the seed fed RGB), and all masks are thresholded at
the detector's own resolution (no bilinear resize of binary masks).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ConfigError
from .associate import Instance
from .vision import (
    VisionUnavailable,
    WeightsSpec,
    WeightsUnavailable,
    import_torchvision,
    load_state_dict,
    pick_device,
    resolve_weights,
)

#: COCO category names by torchvision's 91-slot category id (None: ids unused by COCO).
COCO_BY_ID: tuple[Optional[str], ...] = (
    None, "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack", "umbrella", None,
    None, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", None,
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    None, "dining table", None, None, "toilet", None, "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", None, "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
)
#: The 80 COCO classes in detectron2's contiguous order (its ``pred_classes`` index).
COCO_CLASSES: tuple[str, ...] = tuple(n for n in COCO_BY_ID if n is not None)

#: Class name meaning "any detected object".
ANYTHING = "anything"

DETECTORS = ("torchvision", "detectron2")

_D2_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"


def check_classes(classes: Sequence[str]) -> list[str]:
    """Normalised class names (lower case, ``_`` read as space); ``ConfigError`` for unknown ones."""
    out = []
    for c in classes:
        name = str(c).strip().lower().replace("_", " ")
        if name != ANYTHING and name not in COCO_CLASSES:
            close = difflib.get_close_matches(name, COCO_CLASSES, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(repr(x) for x in close)}?" if close else ""
            raise ConfigError(f"unknown class {c!r}: use a COCO class name (e.g. person, car, dog, "
                              f"sports ball) or {ANYTHING!r}{hint}")
        out.append(name)
    if not out:
        raise ConfigError(f"give at least one class name (a COCO class or {ANYTHING!r})")
    return out


def _wanted(label: str, classes: Sequence[str]) -> bool:
    return ANYTHING in classes or label in classes


def _instances(masks: np.ndarray, scores: np.ndarray, labels: list[str],
               classes: Sequence[str]) -> list[Instance]:
    out = []
    for m, s, lab in zip(masks, scores, labels):
        if lab is None or not _wanted(lab, classes):
            continue
        inst = Instance.from_mask(m, float(s), lab)
        if inst is not None:
            out.append(inst)
    return out


class TorchvisionMaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn_v2`` (COCO-trained, torchvision's improved v2 recipe).

    weights
        ``"default"`` (torchvision's cache), a path, or ``None`` (random: plumbing tests).
    score_threshold, mask_threshold
        Keep instances scoring at least this; a mask pixel is on above ``mask_threshold``.
    min_size, max_size
        The model's internal resize (torchvision's 800/1333 by default); smaller is faster.
    model_options
        Passed to ``maskrcnn_resnet50_fpn_v2`` (e.g. ``rpn_post_nms_top_n_test``,
        ``box_detections_per_img``).
    """

    name = "torchvision"

    def __init__(self, classes: Sequence[str] = ("person",), weights: WeightsSpec = "default",
                 device: Optional[str] = None, score_threshold: float = 0.5,
                 mask_threshold: float = 0.5, min_size: int = 800, max_size: int = 1333,
                 **model_options) -> None:
        self.classes = check_classes(classes)
        tv = import_torchvision()
        det = tv.models.detection
        self.weights_path = resolve_weights(weights, det.MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT.url,
                                            "Mask R-CNN (torchvision v2)", "--detector-weights")
        model = det.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                             box_score_thresh=float(score_threshold),
                                             min_size=int(min_size), max_size=int(max_size),
                                             **model_options)
        if self.weights_path is not None:
            state = load_state_dict(self.weights_path, "Mask R-CNN")
            try:
                model.load_state_dict(state)
            except RuntimeError as e:
                raise WeightsUnavailable(f"{self.weights_path} does not hold maskrcnn_resnet50_fpn_v2 "
                                         f"weights: {str(e).splitlines()[0]}") from None
        self.device = pick_device(device)
        self.model = model.eval().to(self.device)
        self.mask_threshold = float(mask_threshold)

    def __call__(self, frames: np.ndarray) -> list[list[Instance]]:
        import torch

        batch = [torch.from_numpy(np.ascontiguousarray(f)).to(self.device).permute(2, 0, 1).float() / 255.0
                 for f in frames]  # RGB in [0, 1]: what torchvision's detection models take
        with torch.inference_mode():
            outputs = self.model(batch)
        result = []
        for out in outputs:
            masks = (out["masks"][:, 0] > self.mask_threshold).cpu().numpy()
            labels = [COCO_BY_ID[int(i)] if 0 <= int(i) < len(COCO_BY_ID) else None
                      for i in out["labels"].cpu()]
            result.append(_instances(masks, out["scores"].cpu().numpy(), labels, self.classes))
        return result


def detectron2_weights(spec: WeightsSpec) -> Path:
    """The detectron2 model-zoo weights: a path, or ``"default"``: iopath's cache of the zoo URL."""
    if spec is None:
        raise ConfigError("detectron2 needs weights: pass --detector-weights PATH or keep the default")
    if str(spec) != "default":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"detectron2 weights file not found: {path} "
                                     "(given with --detector-weights)")
        return path
    from detectron2 import model_zoo

    url = model_zoo.get_checkpoint_url(_D2_CONFIG)
    root = Path(os.environ.get("FVCORE_CACHE", "~/.torch/iopath_cache")).expanduser()
    rel = url.split("://", 1)[-1].split("/", 1)[-1]
    path = root / rel
    if path.is_file():
        return path
    raise WeightsUnavailable(f"detectron2 Mask R-CNN weights not found: expected {path} (iopath's cache; "
                             f"FVCORE_CACHE moves it). This machine may have no network: copy the file "
                             f"from {url} there, or pass --detector-weights PATH")


class Detectron2MaskRCNN:
    """detectron2's ``mask_rcnn_R_50_FPN_3x`` (the seed's detector), when detectron2 is importable.

    Frames are handed over in the channel order the config's ``INPUT.FORMAT`` names
    (BGR for the model zoo): ``DefaultPredictor`` expects that, and the seed fed RGB.
    """

    name = "detectron2"

    def __init__(self, classes: Sequence[str] = ("person",), weights: WeightsSpec = "default",
                 device: Optional[str] = None, score_threshold: float = 0.5) -> None:
        self.classes = check_classes(classes)
        try:
            from detectron2 import model_zoo
            from detectron2.config import get_cfg
            from detectron2.engine import DefaultPredictor
        except ImportError as e:
            raise VisionUnavailable(f"detectron2 is not importable ({e}); it has no pip wheel: build it "
                                    "from source, or use --detector torchvision") from None
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(_D2_CONFIG))
        cfg.MODEL.WEIGHTS = str(detectron2_weights(weights))
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = float(score_threshold)
        cfg.MODEL.DEVICE = str(pick_device(device))
        self.input_format = str(cfg.INPUT.FORMAT).upper()
        self.predictor = DefaultPredictor(cfg)

    def __call__(self, frames: np.ndarray) -> list[list[Instance]]:
        result = []
        for rgb in frames:
            image = np.ascontiguousarray(rgb[:, :, ::-1] if self.input_format == "BGR" else rgb)
            inst = self.predictor(image)["instances"].to("cpu")
            labels = [COCO_CLASSES[int(i)] if 0 <= int(i) < len(COCO_CLASSES) else None
                      for i in inst.pred_classes]
            result.append(_instances(np.asarray(inst.pred_masks, bool), np.asarray(inst.scores),
                                     labels, self.classes))
        return result


def make_detector(detector: str = "torchvision", classes: Sequence[str] = ("person",),
                  weights: WeightsSpec = "default", device: Optional[str] = None,
                  score_threshold: float = 0.5, **options):
    """Build a detector by name (``torchvision`` or ``detectron2``); class names are checked first."""
    check_classes(classes)
    if detector == "torchvision":
        return TorchvisionMaskRCNN(classes, weights=weights, device=device,
                                   score_threshold=score_threshold, **options)
    if detector == "detectron2":
        return Detectron2MaskRCNN(classes, weights=weights, device=device, score_threshold=score_threshold)
    raise ConfigError(f"unknown detector {detector!r}; choose one of {', '.join(DETECTORS)}")
