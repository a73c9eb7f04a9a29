"""The backend's own Python environment: what to install on this machine (no bpy).

*Preferences > Set up backend* makes a virtual environment in the extension's user
folder, installs the PyTorch build that fits this machine and the backend wheel the
extension ships, verifies it by importing the backend in that Python, and writes a
stamp file saying what it installed. This module holds the decisions, each a plain
function testable without Blender; ``installer`` runs them.

* which Python the environment is made from (Blender's own where it is 3.11/3.12);
* which PyTorch: a CUDA build for an NVIDIA GPU (the driver's CUDA version, read
  without torch through ``libcuda``/``nvidia-smi``, picks the cuXXX index), the
  PyPI build with MPS on Apple silicon, the CPU build otherwise; overridable;
* how much disk it needs, what to (re)do given the stamp and a probe of the
  environment, and what pip's output means (progress and failures).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

#: Pythons the backend is tested on (torch, OpenCV, PyAV wheels exist for both).
SUPPORTED_PYTHONS = ((3, 11), (3, 12))
#: Platforms with PyTorch >= 2.4 wheels (Intel Macs stopped at torch 2.2).
SUPPORTED_PLATFORMS = ("linux-x64", "linux-arm64", "windows-x64", "macos-arm64")
ENV_DIRNAME = "backend-env"
STAMP_NAME = "neural-atlas-env.json"
STAMP_FORMAT = 1
#: pip >= 25.1 resumes broken downloads (a 3 GB CUDA torch over Wi-Fi) and prints
#: machine-readable progress (``--progress-bar raw``); older pips are upgraded first.
MIN_PIP = (25, 1)
PYTORCH_INDEX = "https://download.pytorch.org/whl/"
#: The extras of the backend wheel the add-on needs (movie strips: PyAV / ffmpeg).
BACKEND_EXTRAS = ("video",)
PROBE_MARK = "NEURAL_ATLAS_PROBE "

VARIANTS = ("auto", "cuda", "mps", "cpu")
SOURCES = ("pytorch", "pip", "custom")


class SetupError(Exception):
    """A failure the artist can act on: ``message`` says what, ``hint`` what to do."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


# ------------------------------------------------------------------ platform
def platform_key(system: Optional[str] = None, machine: Optional[str] = None) -> str:
    """``linux-x64``, ``windows-x64``, ``macos-arm64``, ... (Blender's platform names)."""
    system = (system or platform.system()).lower()
    machine = (machine or platform.machine()).lower()
    os_name = {"darwin": "macos", "windows": "windows", "linux": "linux"}.get(system, system)
    arch = {"x86_64": "x64", "amd64": "x64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    return f"{os_name}-{arch}"


def check_platform(key: str, rosetta: bool = False) -> None:
    if key in SUPPORTED_PLATFORMS:
        return
    if key == "macos-x64":
        if rosetta:
            raise SetupError("unsupported_platform", "This is the Intel build of Blender running on an "
                             "Apple silicon Mac (Rosetta); PyTorch has no Intel-Mac builds any more",
                             "Install the Apple silicon build of Blender from blender.org, then Set up backend")
        raise SetupError("unsupported_platform", "PyTorch stopped shipping builds for Intel Macs (its last "
                         "one, 2.2, is older than the backend needs)",
                         "Run the backend on another machine and point the Backend endpoint at it")
    raise SetupError("unsupported_platform", f"The backend cannot be set up on {key}: PyTorch has no "
                     "builds for it", "Run the backend on a Linux, Windows or Apple silicon machine and "
                     "point the Backend endpoint at it")


def running_under_rosetta() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        r = subprocess.run(["sysctl", "-n", "sysctl.proc_translated"], capture_output=True, text=True, timeout=5)
        return r.stdout.strip() == "1"
    except (OSError, subprocess.SubprocessError):
        return False


# -------------------------------------------------------------------- python
def env_python(env_dir: str, windows: Optional[bool] = None) -> str:
    windows = (os.name == "nt") if windows is None else windows
    return os.path.join(env_dir, "Scripts", "python.exe") if windows else os.path.join(env_dir, "bin", "python")


def own_python(executable: str, prefix: str, windows: Optional[bool] = None) -> str:
    """The Python interpreter of the process we run in. In Blender, ``sys.executable``
    is Blender's bundled Python (``<version>/python/bin/python3.11``); in the ``bpy``
    module it is the venv's python; where it is something else (an embedding binary),
    the interpreter is looked up under ``sys.prefix``. '' when none is found."""
    windows = (os.name == "nt") if windows is None else windows
    base = os.path.basename(executable or "").lower()
    if base.startswith("python") and os.path.isfile(executable):
        return executable
    names = ["python.exe"] if windows else [f"python{v[0]}.{v[1]}" for v in reversed(SUPPORTED_PYTHONS)] + [
        "python3.13", "python3"]
    for sub in (("bin",), ()):
        for n in names:
            p = os.path.join(prefix, *sub, n)
            if os.path.isfile(p):
                return p
    return ""


@dataclass(frozen=True)
class PythonInfo:
    path: str
    version: tuple[int, int, int]

    @property
    def short(self) -> str:
        return f"{self.version[0]}.{self.version[1]}"

    @property
    def text(self) -> str:
        return ".".join(map(str, self.version))


# Runs on Python 2 as well, so a wrong pick gets a clear message instead of a SyntaxError.
_VERSION_CODE = ("import sys; print('%d.%d.%d' % tuple(sys.version_info[:3])); "
                 "import venv, ensurepip")


def version_error(version: tuple[int, ...], path: str) -> Optional[SetupError]:
    if tuple(version[:2]) in SUPPORTED_PYTHONS:
        return None
    want = " or ".join(f"{a}.{b}" for a, b in SUPPORTED_PYTHONS)
    return SetupError("python_unsupported", f"{path} is Python {'.'.join(map(str, version))}; the backend "
                      f"needs Python {want}",
                      f"Install Python {SUPPORTED_PYTHONS[-1][0]}.{SUPPORTED_PYTHONS[-1][1]} (python.org, or "
                      "your package manager) and pick its interpreter in Preferences > Python for the "
                      "backend, then Set up backend")


def parse_python_check(path: str, returncode: int, output: str) -> PythonInfo:
    """Judge the output of ``python -c _VERSION_CODE`` (see :func:`python_check_command`)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    m = next((re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", ln) for ln in lines if re.fullmatch(r"\d+\.\d+\.\d+", ln)),
             None)
    if m is None:
        raise SetupError("python_broken", f"{path} is not a working Python interpreter",
                         "Pick the python executable of a Python 3.11 or 3.12 installation "
                         "(e.g. /usr/bin/python3.12 or C:\\...\\Python312\\python.exe)")
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3)))
    err = version_error(version, path)
    if err is not None:
        raise err
    if returncode != 0:
        raise SetupError("python_no_venv", f"Python {'.'.join(map(str, version))} at {path} cannot make "
                         "virtual environments (its venv/ensurepip modules are missing)",
                         "On Debian/Ubuntu: sudo apt install python3-venv (for that version, e.g. "
                         "python3.12-venv); or pick a python.org installation")
    return PythonInfo(path, version)


def python_check_command(path: str) -> list[str]:
    return [path, "-c", _VERSION_CODE]


def inspect_python(path: str, timeout: float = 60.0) -> PythonInfo:
    """Blocking check of an interpreter (a fraction of a second): version and venv support."""
    if not path or not os.path.isfile(path):
        raise SetupError("python_missing", f"no Python interpreter at {path or '(empty path)'}",
                         "Pick the python executable of a Python 3.11 or 3.12 installation in Preferences")
    try:
        r = subprocess.run(python_check_command(path), capture_output=True, text=True, timeout=timeout,
                           env=clean_env(os.environ))
    except (OSError, subprocess.SubprocessError) as e:
        raise SetupError("python_broken", f"{path} could not be run: {e}",
                         "Pick the python executable of a Python 3.11 or 3.12 installation") from None
    return parse_python_check(path, r.returncode, r.stdout + r.stderr)


# ----------------------------------------------------------------------- GPU
@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mb: int = 0
    compute_capability: Optional[tuple[int, int]] = None


@dataclass(frozen=True)
class Nvidia:
    """What the NVIDIA driver says, read without torch."""

    driver: str                              # "570.86.15"
    cuda: Optional[tuple[int, int]]          # the newest CUDA the driver runs, e.g. (12, 8)
    gpus: tuple[Gpu, ...] = ()

    @property
    def text(self) -> str:
        g = self.gpus[0].name if self.gpus else "NVIDIA GPU"
        more = f" (+{len(self.gpus) - 1})" if len(self.gpus) > 1 else ""
        cuda = f", CUDA {self.cuda[0]}.{self.cuda[1]}" if self.cuda else ""
        return f"{g}{more}, driver {self.driver}{cuda}"


NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total,driver_version,compute_cap", "--format=csv,noheader,nounits"]


def parse_nvidia_smi_query(text: str) -> tuple[str, tuple[Gpu, ...]]:
    """Lines of ``name, memory MiB, driver, compute capability`` (the last may be absent)."""
    driver, gpus = "", []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3 or not parts[0] or parts[0].lower().startswith(("name", "no devices", "nvidia-smi has")):
            continue
        try:
            mem = int(float(parts[1]))
        except ValueError:
            mem = 0
        cc = None
        if len(parts) > 3:
            m = re.fullmatch(r"(\d+)\.(\d+)", parts[3])
            cc = (int(m.group(1)), int(m.group(2))) if m else None
        driver = driver or parts[2]
        gpus.append(Gpu(parts[0], mem, cc))
    return driver, tuple(gpus)


def parse_cuda_banner(text: str) -> Optional[tuple[int, int]]:
    """``CUDA Version: 12.8`` from ``nvidia-smi``'s table header."""
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def cuda_from_driver_int(v: int) -> Optional[tuple[int, int]]:
    """``cuDriverGetVersion``'s 12080 -> (12, 8)."""
    return (v // 1000, (v % 1000) // 10) if v > 0 else None


def cuda_driver_version() -> Optional[tuple[int, int]]:
    """The driver's CUDA version from libcuda itself (no torch, no CUDA toolkit)."""
    names = ["nvcuda.dll"] if os.name == "nt" else ["libcuda.so.1", "libcuda.so", ctypes.util.find_library("cuda")]
    for n in names:
        if not n:
            continue
        try:
            lib = ctypes.CDLL(n)
        except OSError:
            continue
        v = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(v)) == 0:
                return cuda_from_driver_int(v.value)
        except (AttributeError, OSError):
            continue
    return None


def detect_nvidia(run: Callable[..., Any] = subprocess.run, cuda_version: Callable[[], Any] = cuda_driver_version
                  ) -> Optional[Nvidia]:
    """The NVIDIA GPUs and driver, or None (no driver / no GPU). Never imports torch."""
    exe = shutil.which("nvidia-smi")
    if exe is None and os.name == "nt":
        cand = os.path.join(os.environ.get("SystemRoot", r"C:\Windows"), "System32", "nvidia-smi.exe")
        exe = cand if os.path.isfile(cand) else None
    driver, gpus, banner = "", (), None
    if exe:
        for query in (NVIDIA_SMI_QUERY, [NVIDIA_SMI_QUERY[0].replace(",compute_cap", ""), NVIDIA_SMI_QUERY[1]]):
            try:
                r = run([exe, *query], capture_output=True, text=True, timeout=15)
            except (OSError, subprocess.SubprocessError):
                break
            if r.returncode == 0:
                driver, gpus = parse_nvidia_smi_query(r.stdout)
                break
        if gpus:
            try:
                banner = parse_cuda_banner(run([exe], capture_output=True, text=True, timeout=15).stdout)
            except (OSError, subprocess.SubprocessError):
                banner = None
    cuda = cuda_version() or banner
    if not gpus and cuda is None:
        return None
    return Nvidia(driver or "unknown", cuda, gpus)


# --------------------------------------------------------------------- torch
@dataclass(frozen=True)
class CudaBuild:
    tag: str                        # the index's name: cu128
    cuda: tuple[int, int]           # the CUDA runtime it is built with (the driver must run it)
    min_cc: tuple[int, int]         # oldest GPU architecture it has kernels for
    max_cc: tuple[int, int]         # newest


#: PyTorch's CUDA indexes, preferred first. cu128 is the broadest current build (Volta to
#: Blackwell); cu126 keeps Maxwell/Pascal; the older ones serve old drivers (their
#: indexes stop at older torch releases, all >= the backend's 2.4).
CUDA_BUILDS = (
    CudaBuild("cu128", (12, 8), (7, 0), (12, 9)),
    CudaBuild("cu126", (12, 6), (5, 0), (9, 0)),
    CudaBuild("cu124", (12, 4), (5, 0), (9, 0)),
    CudaBuild("cu121", (12, 1), (5, 0), (9, 0)),
    CudaBuild("cu118", (11, 8), (3, 7), (9, 0)),
)
#: Driver versions that first run a CUDA release (Linux / Windows), for the message.
DRIVER_FOR_CUDA = {(12, 8): ("570.26", "570.65"), (12, 6): ("560.28", "560.76"),
                   (12, 4): ("550.54", "551.61"), (12, 1): ("530.30", "531.14"), (11, 8): ("520.61", "522.06")}


@dataclass(frozen=True)
class TorchChoice:
    variant: str            # cuda | mps | cpu
    tag: str                # cu128 | cpu | pypi
    requirement: str        # torch>=2.4 (from the backend wheel) or a setting
    index_url: str          # '' = pip's own configuration (PyPI or a studio mirror)
    reason: str             # why: shown in Preferences

    @property
    def label(self) -> str:
        return {"cuda": f"CUDA ({self.tag})", "mps": "Apple GPU (MPS)", "cpu": "CPU only"}[self.variant]

    def key(self) -> dict[str, str]:
        """What the stamp compares: a different key means a different torch install."""
        return {"variant": self.variant, "tag": self.tag, "requirement": self.requirement,
                "index_url": self.index_url}


def pick_cuda_build(nv: Nvidia) -> CudaBuild:
    """The newest-preferred build the driver can run and every GPU has kernels in."""
    if nv.cuda is None:
        raise SetupError("driver_unknown", f"Could not read the CUDA version of the NVIDIA driver {nv.driver}",
                         "Update or reinstall the NVIDIA driver (nvidia.com/drivers), or choose "
                         "PyTorch: CPU in Preferences")
    ccs = [g.compute_capability for g in nv.gpus if g.compute_capability]
    fits = [b for b in CUDA_BUILDS if b.cuda <= nv.cuda]
    for b in fits:
        if all(b.min_cc <= cc <= b.max_cc for cc in ccs):
            return b
    if not fits:
        oldest = CUDA_BUILDS[-1]
        lin, win = DRIVER_FOR_CUDA[oldest.cuda]
        raise SetupError("driver_too_old", f"The NVIDIA driver {nv.driver} runs CUDA up to "
                         f"{nv.cuda[0]}.{nv.cuda[1]}; PyTorch needs CUDA {oldest.cuda[0]}.{oldest.cuda[1]} "
                         "or newer", f"Update the NVIDIA driver to {lin} or newer on Linux ({win} on "
                         "Windows; nvidia.com/drivers), or choose PyTorch: CPU in Preferences (slow)")
    # the driver is recent enough for some build but none has kernels for this GPU
    need = [b for b in CUDA_BUILDS if all(b.min_cc <= cc <= b.max_cc for cc in ccs)]
    gpu = nv.gpus[0].name if nv.gpus else "this GPU"
    if need:
        b = need[-1]
        lin, win = DRIVER_FOR_CUDA[b.cuda]
        raise SetupError("driver_too_old", f"{gpu} needs a PyTorch built with CUDA {b.cuda[0]}.{b.cuda[1]}, "
                         f"which the NVIDIA driver {nv.driver} (CUDA {nv.cuda[0]}.{nv.cuda[1]}) cannot run",
                         f"Update the NVIDIA driver to {lin} or newer on Linux ({win} on Windows; "
                         "nvidia.com/drivers), or choose PyTorch: CPU in Preferences (slow)")
    raise SetupError("gpu_unsupported", f"{gpu} (compute capability "
                     f"{'.'.join(map(str, ccs[0])) if ccs else '?'}) is not supported by current PyTorch builds",
                     "Choose PyTorch: CPU in Preferences (slow), or run the backend on another machine")


def choose_torch(platform_name: str, nvidia: Optional[Nvidia], *, variant: str = "auto", requirement: str = "",
                 source: str = "pytorch", custom_index: str = "", default_requirement: str = "torch") -> TorchChoice:
    """The PyTorch to install. ``variant`` auto picks CUDA for an NVIDIA GPU, MPS on
    Apple silicon, else CPU; ``source`` pytorch = PyTorch's own index for the build
    (PyPI on macOS), pip = pip's configuration (PyPI, a studio mirror, local disk),
    custom = ``custom_index``. ``requirement`` '' = ``default_requirement``."""
    if variant not in VARIANTS:
        raise SetupError("bad_setting", f"unknown PyTorch variant {variant!r}")
    if source not in SOURCES:
        raise SetupError("bad_setting", f"unknown PyTorch source {source!r}")
    mac = platform_name.startswith("macos")
    why = ""
    if variant == "auto":
        if mac:
            variant, why = ("mps", "Apple silicon: the PyPI build uses the GPU through MPS")
        elif nvidia is not None and nvidia.gpus:
            variant, why = "cuda", nvidia.text
        else:
            variant, why = "cpu", "no NVIDIA GPU found: CPU only (slow; fine for previews)"
    if variant == "mps" and not mac:
        raise SetupError("bad_setting", "PyTorch MPS exists only on macOS", "Choose Automatic, CUDA or CPU")
    if variant == "cuda" and mac:
        raise SetupError("bad_setting", "PyTorch has no CUDA builds for macOS", "Choose Automatic or CPU")
    if variant == "cuda":
        if nvidia is None:
            raise SetupError("no_gpu", "CUDA was chosen but no NVIDIA driver was found on this machine",
                             "Install the NVIDIA driver (nvidia.com/drivers), or choose Automatic/CPU")
        tag = pick_cuda_build(nvidia).tag
        why = why or nvidia.text
    elif variant == "mps":
        tag, why = "pypi", why or "Apple silicon (MPS)"
    else:
        tag, why = "cpu", why or "CPU chosen in Preferences"
    if source == "custom":
        if not re.match(r"^(https?|file)://", custom_index.strip()):
            raise SetupError("bad_setting", f"the PyTorch index {custom_index!r} is not an http(s):// or "
                             "file:// URL", "Enter the URL of a package index, e.g. "
                             f"{PYTORCH_INDEX}{tag if tag != 'pypi' else 'cpu'}")
        index = custom_index.strip()
    elif source == "pip" or tag == "pypi":
        index = ""
    else:
        index = PYTORCH_INDEX + tag
    return TorchChoice(variant, tag, requirement.strip() or default_requirement, index, why)


def wheel_requirement(wheel: str, name: str) -> str:
    """The requirement on ``name`` in the wheel's metadata (``torch>=2.4``), '' if none."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode("utf-8", "replace")
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = line.split(":", 1)[1].strip()
            if ";" in req:
                continue  # an extra's or a marker's requirement
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", req)
            if m and m.group(1).lower().replace("_", "-") == name:
                return (m.group(1) + m.group(2).replace(" ", "")).strip()
    return ""


def wheel_version(wheel: str) -> str:
    parts = os.path.basename(wheel).split("-")
    return parts[1] if len(parts) >= 5 else ""


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- disk
#: (download, installed) MB. cpu is measured here (Linux, Python 3.11, torch 2.13 CPU,
#: the backend with its video extra: 1.42 GB installed); the others are estimates from
#: the published wheel sizes (CUDA: torch plus the nvidia-* runtime wheels).
TORCH_MB = {"cpu": (210, 880), "mps": (90, 420), "cuda": (3500, 7300)}
BACKEND_DEPS_MB = (190, 510)
VENV_MB = (15, 40)
MARGIN = 1.1


def required_bytes(steps: Sequence[str], variant: str) -> int:
    """Free space the steps need: what they install plus what pip downloads meanwhile
    (its cache lives in the extension folder until the setup finishes), with a margin."""
    mb = 0.0
    for s in steps:
        dl, inst = {"venv": VENV_MB, "torch": TORCH_MB.get(variant, TORCH_MB["cuda"]),
                    "backend": BACKEND_DEPS_MB}.get(s, (0, 0))
        mb += dl + inst
    return int(mb * MARGIN * 1e6)


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def check_disk(path: str, needed: int, free: Optional[int] = None) -> int:
    """Raise a clear message when ``path``'s drive has less than ``needed`` bytes free."""
    probe = path
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe or ".").free if free is None else free
    if free < needed:
        raise SetupError("disk_full", f"Not enough disk space: setting up the backend needs about {gb(needed)} "
                         f"free, the drive of {path} has {gb(free)}",
                         f"Free at least {gb(needed - free)} on that drive (or empty the trash), then "
                         "Set up backend again")
    return free


# --------------------------------------------------------- child environment
#: Variables that would send pip or Python somewhere outside the environment.
_DROP = ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONUSERBASE", "PYTHONEXECUTABLE", "VIRTUAL_ENV",
         "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_EDITABLE", "PIP_SRC", "CONDA_PREFIX", "__PYVENV_LAUNCHER__")


def clean_env(base: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in _DROP}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def child_env(base: Mapping[str, str], user_dir: str) -> dict[str, str]:
    """The environment of the setup's subprocesses: no user site, no inherited Python
    paths, pip's cache and every temporary file inside the extension's user folder.
    pip's own configuration (a studio mirror, a proxy, certificates) is kept."""
    env = clean_env(base)
    tmp = os.path.join(user_dir, "tmp")
    env.update({"PIP_CACHE_DIR": os.path.join(user_dir, "cache", "pip"), "TMPDIR": tmp, "TEMP": tmp, "TMP": tmp,
                "PIP_USER": "0", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_NO_WARN_SCRIPT_LOCATION": "1", "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"})
    return env


# --------------------------------------------------------------------- stamp
def stamp_path(env_dir: str) -> str:
    return os.path.join(env_dir, STAMP_NAME)


def read_stamp(env_dir: str) -> dict[str, Any]:
    try:
        with open(stamp_path(env_dir), encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) and d.get("format") == STAMP_FORMAT else {}


def write_stamp(env_dir: str, data: Mapping[str, Any]) -> None:
    """Atomic: a reader sees the old or the new stamp, never half of one."""
    d = dict(data)
    d["format"] = STAMP_FORMAT
    d["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
    path = stamp_path(env_dir)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(d, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def mark_step(env_dir: str, stamp: dict[str, Any], step: str, info: Optional[Mapping[str, Any]]) -> None:
    """Record (``info``) or forget (None) a step. Forgetting happens just before the step
    changes the environment: it clears ``complete`` and notes the step as ``running``, so
    a step interrupted half-way (cancel, crash, power cut) is redone from scratch."""
    steps = dict(stamp.get("steps") or {})
    if info is None:
        steps.pop(step, None)
        stamp["complete"] = False
        stamp["running"] = step
        stamp.pop("verified", None)
    else:
        steps[step] = dict(info)
        stamp.pop("running", None)
    stamp["steps"] = steps
    write_stamp(env_dir, stamp)


def ready(stamp: Mapping[str, Any]) -> bool:
    return bool(stamp.get("complete")) and bool(stamp.get("verified"))


# --------------------------------------------------------------------- probe
#: Runs in the environment's Python: what imports, from where, on which device.
PROBE_CODE = r'''
import json, os, sys, time, warnings
t0 = time.time()
out = {"python": "%d.%d.%d" % sys.version_info[:3], "prefix": sys.prefix, "missing": [], "errors": {}}
try:
    import pip
    out["pip"] = pip.__version__
except Exception as e:
    out["pip"] = None
for mod in ("numpy", "cv2", "imageio", "safetensors", "zmq", "msgpack"):
    try:
        __import__(mod)
    except Exception as e:
        out["missing"].append(mod); out["errors"][mod] = "%s: %s" % (type(e).__name__, e)
try:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import torch
        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = bool(torch.cuda.is_available())
        mps = getattr(torch.backends, "mps", None)
        out["mps_available"] = bool(mps is not None and mps.is_available())
        if out["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            out["device"] = {"type": "cuda", "name": p.name, "memory_total": int(p.total_memory)}
        elif out["mps_available"]:
            out["device"] = {"type": "mps", "name": "Apple GPU"}
        else:
            out["device"] = {"type": "cpu", "name": "CPU"}
    out["torch_warnings"] = [str(w.message)[:400] for w in caught]
except Exception as e:
    out["errors"]["torch"] = "%s: %s" % (type(e).__name__, e)
try:
    import backend, backend.cli, backend.service.server
    from importlib.metadata import version
    out["backend"] = version("neural-atlas")
    out["backend_file"] = os.path.abspath(backend.__file__)
except Exception as e:
    out["errors"]["backend"] = "%s: %s" % (type(e).__name__, e)
if "--size" in sys.argv:
    total = 0
    for d, _dirs, files in os.walk(sys.prefix):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except OSError:
                pass
    out["size"] = total
out["seconds"] = round(time.time() - t0, 2)
print("NEURAL_ATLAS_PROBE " + json.dumps(out), flush=True)
'''


def parse_probe(output: str) -> Optional[dict[str, Any]]:
    for line in reversed(output.splitlines()):
        if line.startswith(PROBE_MARK):
            try:
                d = json.loads(line[len(PROBE_MARK):])
            except ValueError:
                return None
            return d if isinstance(d, dict) else None
    return None


#: The distributions behind the modules the probe imports (to reinstall a broken one).
MODULE_DISTS = {"numpy": "numpy", "cv2": "opencv-python-headless", "imageio": "imageio",
                "safetensors": "safetensors", "zmq": "pyzmq", "msgpack": "msgpack"}


def probe_ok(probe: Optional[Mapping[str, Any]], env_dir: str) -> bool:
    """The backend, torch and every dependency import, from this environment."""
    if not probe or probe.get("missing") or probe.get("errors") or not probe.get("torch"):
        return False
    f = os.path.normcase(os.path.abspath(str(probe.get("backend_file") or "")))
    return f.startswith(os.path.normcase(os.path.abspath(env_dir)) + os.sep)


def version_tuple(v: Optional[str]) -> tuple[int, ...]:
    out = []
    for p in re.split(r"[.+]", v or ""):
        if not p.isdigit():
            break
        out.append(int(p))
    return tuple(out)


def probe_problem(probe: Optional[Mapping[str, Any]], choice: Optional[TorchChoice],
                  nvidia: Optional[Nvidia] = None) -> Optional[SetupError]:
    """What is wrong with a freshly installed environment, as the artist should hear it."""
    if not probe:
        return SetupError("verify_failed", "The new environment's Python did not run the check",
                          "See the log; Repair recreates what is missing")
    errs = dict(probe.get("errors") or {})
    if "torch" in errs:
        return SetupError("verify_failed", f"PyTorch does not load: {errs['torch']}",
                          "Repair reinstalls it; if that does not help, choose PyTorch: CPU")
    if errs:
        name, e = next(iter(errs.items()))
        return SetupError("verify_failed", f"{name} does not load: {e}", "Repair reinstalls the backend")
    if choice is not None and choice.variant == "cuda" and not probe.get("cuda_available"):
        warn = " ".join(probe.get("torch_warnings") or [])
        drv = f" {nvidia.driver}" if nvidia else ""
        if "too old" in warn.lower() or "driver" in warn.lower():
            return SetupError("driver_too_old", f"PyTorch {probe.get('torch')} (CUDA {probe.get('torch_cuda')}) "
                              f"cannot use the GPU: the NVIDIA driver{drv} is too old for it",
                              "Update the NVIDIA driver (nvidia.com/drivers) and Repair, or choose "
                              "PyTorch: CPU")
        return SetupError("gpu_unusable", f"PyTorch {probe.get('torch')} was installed with CUDA "
                          f"{probe.get('torch_cuda')} but does not see the GPU ({warn[:200] or 'no reason given'})",
                          "Check the NVIDIA driver (nvidia-smi), then Repair; or choose PyTorch: CPU")
    return None


# ---------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Target:
    """What the environment should hold."""

    python: PythonInfo
    wheel: str
    wheel_sha256: str
    torch: TorchChoice
    extras: tuple[str, ...] = BACKEND_EXTRAS

    def backend_key(self) -> dict[str, Any]:
        return {"wheel": os.path.basename(self.wheel), "sha256": self.wheel_sha256, "extras": list(self.extras)}


def plan(target: Target, stamp: Mapping[str, Any], probe: Optional[Mapping[str, Any]], env_dir: str,
         repair: bool = False) -> list[str]:
    """The install steps still to run, in order (a subset of venv, pip, torch, backend).
    [] = the existing environment is complete and current: reuse it."""
    steps = dict(stamp.get("steps") or {})
    runs = probe is not None
    venv = steps.get("venv") or {}
    def short(v: Any) -> str:
        return ".".join(str(v or "").split(".")[:2])

    if not runs or not venv or short(venv.get("python_version")) != target.python.short or \
            short((probe or {}).get("python")) != target.python.short:
        return ["venv", "pip", "torch", "backend"]
    errs = dict((probe or {}).get("errors") or {})
    out = []
    if "pip" not in steps or version_tuple((probe or {}).get("pip")) < MIN_PIP:
        out.append("pip")
    if steps.get("torch", {}).get("key") != target.torch.key() or "torch" in errs:
        out.append("torch")
    if (steps.get("backend", {}).get("key") != target.backend_key() or "backend" in errs
            or (probe or {}).get("missing") or repair or not probe_ok(probe, env_dir)):
        out.append("backend")
    if not out and not ready(stamp):
        out.append("backend")  # finished installing but never verified: verify again
    return out


# --------------------------------------------------------------- pip output
@dataclass
class PipProgress:
    """What one pip command is doing, read from its output line by line."""

    expected_bytes: int = 0          # what the plan expects this command to download
    done_bytes: int = 0              # finished downloads
    current_bytes: int = 0
    current_total: int = 0
    current: str = ""                # the file being fetched
    installing: bool = False
    detail: str = ""
    errors: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        if self.installing:
            return 0.9
        if self.expected_bytes <= 0:
            return 0.05
        got = self.done_bytes + self.current_bytes
        return min(0.85, 0.05 + 0.8 * got / self.expected_bytes)


_SIZE_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1 << 20, "gib": 1 << 30}


def _size(num: str, unit: str) -> int:
    return int(float(num) * _SIZE_UNITS.get(unit.lower(), 1))


def pip_line(p: PipProgress, line: str) -> None:
    """Fold one line of pip's output (``--progress-bar raw``) into ``p``."""
    s = line.strip()
    if not s:
        return
    m = re.match(r"Progress (\d+) of (\d+)$", s)
    if m:
        p.current_bytes, p.current_total = int(m.group(1)), int(m.group(2))
        if p.current_total:
            p.detail = f"Downloading {p.current} ({p.current_bytes / 1e6:.0f} / {p.current_total / 1e6:.0f} MB)"
        return
    m = re.match(r"Downloading (\S+?)(?: \((\d+(?:\.\d+)?) (\w+)\))?$", s)
    if m:
        p.done_bytes += p.current_total or p.current_bytes
        p.current_bytes = p.current_total = 0
        p.current = _dist_name(m.group(1))
        if m.group(2):
            p.current_total = _size(m.group(2), m.group(3))
        p.detail = f"Downloading {p.current}" + (f" ({m.group(2)} {m.group(3)})" if m.group(2) else "")
        return
    m = re.match(r"(Collecting|Processing) (\S+)", s)
    if m:
        p.detail = ("Resolving " if m.group(1) == "Collecting" else "Reading ") + _dist_name(m.group(2))
        return
    if s.startswith("Installing collected packages:"):
        p.done_bytes += p.current_total or p.current_bytes
        p.current_bytes = p.current_total = 0
        p.installing = True
        names = [n.strip() for n in s.split(":", 1)[1].split(",") if n.strip()]
        big = [n for n in names if n == "torch" or n.startswith(("nvidia-cudnn", "nvidia-cublas"))]
        p.detail = f"Installing {len(names)} package{'s' if len(names) != 1 else ''}" + (
            f" (unpacking {', '.join(big)} takes a while)" if big else "")
        return
    if s.startswith("Successfully installed"):
        p.detail = "Installed"
        return
    if s.startswith("ERROR:") or "Error" in s.split(":")[0]:
        p.errors.append(s)


def _dist_name(s: str) -> str:
    base = os.path.basename(s.split("#")[0].split("?")[0])
    return base if len(base) < 90 else base[:87] + "..."


_NETWORK = re.compile(r"NewConnectionError|Failed to establish a new connection|Temporary failure in name "
                      r"resolution|Name or service not known|nodename nor servname|getaddrinfo failed|Network is "
                      r"unreachable|Connection refused|ConnectTimeoutError|Read timed out|ProxyError|No route to "
                      r"host|Connection reset|RemoteDisconnected|Could not fetch URL|connection broken by|"
                      r"HTTPSConnectionPool|HTTPConnectionPool|IncompleteRead", re.I)
_TLS = re.compile(r"SSLError|CERTIFICATE_VERIFY_FAILED|certificate verify failed", re.I)
_DISK = re.compile(r"No space left on device|\[Errno 28\]|WinError 112|Disk quota exceeded|\[Errno 122\]", re.I)
_PERM = re.compile(r"Permission denied|\[WinError 5\]|\[WinError 32\]|Access is denied", re.I)
_HASH = re.compile(r"DO NOT MATCH THE HASHES|hash mismatch", re.I)
_NOMATCH = re.compile(r"No matching distribution found for (\S+)|Could not find a version that satisfies the "
                      r"requirement (\S+)", re.I)


def index_hosts(urls: Sequence[str]) -> str:
    hosts = []
    for u in urls:
        m = re.match(r"^\w+://([^/]+)", u or "")
        if m and m.group(1) not in hosts:
            hosts.append(m.group(1))
    return ", ".join(hosts) or "pypi.org"


def classify_failure(output: str, returncode: int, *, what: str, index_urls: Sequence[str] = (),
                     python: str = "", platform_name: str = "", log_path: str = "") -> SetupError:
    """Turn a failed pip command's output into a message that says what to do."""
    hosts = index_hosts(index_urls)
    see = f" (log: {log_path})" if log_path else ""
    if _DISK.search(output):
        return SetupError("disk_full", f"The disk filled up while installing {what}",
                          f"Free some space on the drive of the extension's folder, then Set up backend{see}")
    if _TLS.search(output):
        return SetupError("network_tls", f"Could not download {what}: the secure connection to {hosts} was "
                          "refused (a proxy or antivirus that inspects HTTPS?)",
                          f"Allow {hosts} in the proxy/antivirus, or give pip the company certificate "
                          f"(PIP_CERT){see}")
    if _NETWORK.search(output):
        return SetupError("network", f"Could not download {what}: the package index ({hosts}) is unreachable",
                          f"Check the internet connection (or proxy: HTTPS_PROXY) and Set up backend again; "
                          f"what was already installed is kept{see}")
    if _HASH.search(output):
        return SetupError("download_corrupt", f"A download of {what} arrived damaged",
                          f"Set up backend again (it downloads it anew){see}")
    m = _NOMATCH.search(output)
    if m:
        req = (m.group(1) or m.group(2) or what).rstrip(".")
        return SetupError("no_build", f"No build of {req} for Python {python or '?'} on {platform_name or 'this platform'}"
                          f" at {hosts}", "Check the PyTorch variant and requirement in Preferences > Set up "
                          f"backend (advanced), or pick a Python 3.11/3.12{see}")
    if _PERM.search(output):
        return SetupError("permission", f"Could not write the environment while installing {what} (a file "
                          "is in use or access was denied)", "Stop the backend (and antivirus scans of the "
                          f"folder), then Repair{see}")
    last = next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip().startswith("ERROR")), "")
    last = last or next((ln.strip() for ln in reversed(output.splitlines()) if ln.strip()), "")
    return SetupError("install_failed", f"Installing {what} failed (exit code {returncode}): {last[:300]}",
                      f"See the log{see}; Repair retries")

