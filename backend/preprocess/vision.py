"""torchvision, imported lazily, and model weights found without a network.

The backend runs without torchvision: only RAFT flow and the torchvision Mask R-CNN
detector need it, and they import it through :func:`import_torchvision`, which turns a
missing or broken install into a :class:`VisionUnavailable` that says what to install.

Compatibility mode: a torchvision wheel built for CUDA beside a CPU-only torch (the
case of PyPI's x86-64 torchvision next to a CPU torch build) cannot load its compiled
operators, and ``import torchvision`` then dies with "operator torchvision::nms does
not exist". The models themselves are plain PyTorch except two operators, so instead
of giving up we import torchvision without its operator registrations for
``torch.compile`` (the only module that needs the compiled library at import time) and
use pure-PyTorch versions of the two: torchvision's own Python ``roi_align`` (which it
selects by itself when its operators are missing; we run it eagerly rather than through
``torch.compile``) and the ``nms`` below. A warning says
so once. RAFT needs neither; Mask R-CNN is slower on CPU this way but gives the same
detections.

Weights: ``"default"`` means torchvision's standard file in its cache folder
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``, by default
``~/.cache/torch/hub/checkpoints``); a path means that file; ``None`` means random
initialisation (tests). Nothing is downloaded unless ``NEURAL_ATLAS_DOWNLOAD_WEIGHTS=1``;
when the file is missing :class:`WeightsUnavailable` names the file, the folder, the
URL it comes from and the option that takes a path.
"""

from __future__ import annotations

import os
import sys
import types
import warnings
from pathlib import Path
from typing import Optional, Union

from ..errors import ConfigError

WeightsSpec = Union[str, os.PathLike, None]

#: Environment variable that allows downloading missing default weights (off by default).
DOWNLOAD_ENV = "NEURAL_ATLAS_DOWNLOAD_WEIGHTS"

_compat_mode = False


class VisionUnavailable(ConfigError, NotImplementedError):
    """A preprocessing method that cannot run in this build or environment."""


class WeightsUnavailable(VisionUnavailable):
    """Model weights that are not on this machine (and may not be downloaded)."""


def torchvision_for_torch(torch_version: str) -> str:
    """The torchvision release that matches a torch release (2.N -> 0.(N+15)), e.g. '0.28.*'."""
    parts = torch_version.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return "matching your torch"
    if major != 2:
        return "matching your torch"
    return f"0.{minor + 15}.*"


def import_torchvision():
    """Import torchvision, or raise :class:`VisionUnavailable` with what to install.

    Falls back to compatibility mode (module docstring) when only its compiled
    operators fail to load.
    """
    global _compat_mode
    try:
        import torchvision
        return torchvision
    except ModuleNotFoundError as e:
        if e.name != "torchvision":
            raise
        import torch
        raise VisionUnavailable(
            f"torchvision is not installed; RAFT flow and the torchvision Mask R-CNN need it: "
            f"pip install 'torchvision=={torchvision_for_torch(torch.__version__)}' "
            f"(matching torch {torch.__version__}), or use --flow dis and your own masks") from None
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise VisionUnavailable(f"torchvision is installed but cannot be imported: {e}") from None
        reason = str(e)
    # compiled operators missing: import without the torch.compile registrations
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    try:
        import torchvision
    except Exception as e:  # noqa: BLE001 - anything here means the install is unusable
        raise VisionUnavailable(f"torchvision is installed but cannot be imported ({reason}; "
                                f"then {e}); install the torchvision release built for your torch") from None
    torchvision.ops.boxes.nms = nms
    torchvision.ops.nms = nms
    # torchvision wraps its Python roi_align in torch.compile (compiling costs seconds per
    # new shape on a CPU, minutes for a clip); run it eagerly instead
    ra = sys.modules.get("torchvision.ops.roi_align")
    eager = getattr(getattr(ra, "_roi_align", None), "__wrapped__", None)
    if eager is not None:
        ra._roi_align = eager
    _compat_mode = True
    import torch
    warnings.warn(f"torchvision {torchvision.__version__} cannot load its compiled operators beside "
                  f"torch {torch.__version__} ({reason}); using pure-PyTorch nms/roi_align instead "
                  "(same results, slower detection)", stacklevel=2)
    return torchvision


def compat_mode() -> bool:
    """True when torchvision was imported without its compiled operators."""
    return _compat_mode


def nms(boxes, scores, iou_threshold: float):
    """Greedy non-maximum suppression in PyTorch, as ``torchvision.ops.nms``: indices of the
    kept boxes ``(x1, y1, x2, y2)`` by decreasing score; a box is dropped when its IoU with
    a kept, higher-scoring box is above ``iou_threshold``."""
    import numpy as np
    import torch

    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    order = torch.argsort(scores, descending=True)
    b = boxes[order].float()
    area = (b[:, 2] - b[:, 0]).clamp_min(0) * (b[:, 3] - b[:, 1]).clamp_min(0)
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=2)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp_min(1e-12)
    over = (iou > iou_threshold).cpu().numpy()
    n = over.shape[0]
    dropped = np.zeros(n, bool)
    keep = []
    for i in range(n):
        if not dropped[i]:
            keep.append(i)
            dropped |= over[i]
    return order[torch.as_tensor(keep, dtype=torch.int64, device=order.device)]


# ------------------------------------------------------------------- weights
def weights_cache_dir() -> Path:
    """torchvision's weights cache: ``torch.hub.get_dir()/checkpoints`` (honours TORCH_HOME)."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: WeightsSpec, url: str, what: str, option: str) -> Optional[Path]:
    """The weights file to load: ``None`` for random weights, else an existing path.

    spec
        ``"default"``: torchvision's cached file for ``url`` (downloaded only when
        ``NEURAL_ATLAS_DOWNLOAD_WEIGHTS=1``); a path: that file; ``None``: random init.
    Raises :class:`WeightsUnavailable` naming the file, the cache folder, the URL and ``option``.
    """
    if spec is None:
        return None
    if str(spec) != "default":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise WeightsUnavailable(f"{what} weights file not found: {path} (given with {option})")
        return path
    filename = url.rsplit("/", 1)[-1]
    path = weights_cache_dir() / filename
    if path.is_file():
        return path
    if os.environ.get(DOWNLOAD_ENV) == "1":
        import torch

        try:
            torch.hub.download_url_to_file(url, str(path), progress=False)
            return path
        except Exception as e:  # noqa: BLE001 - report any network failure the same way
            raise WeightsUnavailable(f"{what} weights could not be downloaded from {url}: {e}") from None
    raise WeightsUnavailable(
        f"{what} weights not found: expected {path} (torchvision's weights cache; TORCH_HOME moves it). "
        f"Nothing is downloaded without {DOWNLOAD_ENV}=1 and this machine may have no network: "
        f"copy {filename} (from {url}) there, or pass {option} PATH")


def load_state_dict(path: Path, what: str) -> dict:
    """A state dict from a ``.pth`` (loaded with ``weights_only=True``) or ``.safetensors`` file."""
    import torch

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or foreign files alike
        raise WeightsUnavailable(f"cannot read {what} weights {path}: {e}") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # detectron2-style and training checkpoints
    if not isinstance(state, dict):
        raise WeightsUnavailable(f"{what} weights {path} hold no state dict")
    return state


def pick_device(device: Optional[str]):
    """``torch.device``: the one asked for, else CUDA when available, else CPU."""
    import torch

    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
