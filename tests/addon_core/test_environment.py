"""The backend environment's decisions (neural_atlas.core.environment) and the installer
job (neural_atlas.core.installer) with plain pytest: real interpreters, real pip runs
against an unreachable index, a real pip interrupted by Cancel, real files.

The full install (CPU torch from this machine's disk) is exercised once, through Blender,
in tests/blender/test_setup.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import zipfile

import pytest

from neural_atlas.core import environment as E
from neural_atlas.core import installer as I

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY313 = "/root/.pyenv/versions/3.13.0/bin/python3.13"
PY27 = "/root/.pyenv/versions/2.7.18/bin/python2.7"
CPU_TORCH = E.TorchChoice("cpu", "cpu", "torch==2.13.0", "", "test: this machine's CPU torch from local disk")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_backend_wheel"), "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


# ------------------------------------------------------------- the wheel
def test_backend_wheel_holds_every_module_and_is_reproducible(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "backend/service/server.py" in names and "neural_atlas/core/protocol.py" in names
    assert "neural_atlas/core/environment.py" in names
    assert not [n for n in names if n.startswith("neural_atlas/blender/")]  # the bpy shell stays out
    assert "Provides-Extra: video" in meta
    # its dependencies come from pyproject; torch's requirement is what the setup falls back to
    assert E.wheel_requirement(wheel, "torch") == "torch>=2.4"
    assert E.wheel_requirement(wheel, "pyzmq").startswith("pyzmq>=")
    assert E.wheel_requirement(wheel, "av") == ""  # an extra's, not a base requirement
    # the same sources give the same bytes (the setup reinstalls only when the backend changed)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_backend_wheel"), "--out",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert E.sha256(r.stdout.strip().splitlines()[-1]) == E.sha256(wheel)


# --------------------------------------------------------- platform, python
def test_platforms():
    assert E.platform_key("Linux", "x86_64") == "linux-x64"
    assert E.platform_key("Windows", "AMD64") == "windows-x64"
    assert E.platform_key("Darwin", "arm64") == "macos-arm64"
    assert E.platform_key("Linux", "aarch64") == "linux-arm64"
    for ok in ("linux-x64", "windows-x64", "macos-arm64"):
        E.check_platform(ok)
    with pytest.raises(E.SetupError) as e:
        E.check_platform("macos-x64")
    assert e.value.code == "unsupported_platform" and "Intel Macs" in e.value.message
    with pytest.raises(E.SetupError) as e:
        E.check_platform("macos-x64", rosetta=True)
    assert "Apple silicon build of Blender" in e.value.hint
    with pytest.raises(E.SetupError) as e:
        E.check_platform("windows-arm64")
    assert "no builds" in e.value.message and "Backend endpoint" in e.value.hint


def test_own_python_in_the_bpy_module_and_in_blender(tmp_path):
    # the bpy module: sys.executable is the venv's python
    assert E.own_python(sys.executable, sys.prefix) == sys.executable
    # Blender: sys.executable may be the blender binary; the interpreter sits under sys.prefix
    prefix = tmp_path / "5.0" / "python"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin" / "python3.11").write_text("")
    blender = tmp_path / "blender"
    blender.write_text("")
    assert E.own_python(str(blender), str(prefix), windows=False) == str(prefix / "bin" / "python3.11")
    (prefix / "bin" / "python.exe").write_text("")
    assert E.own_python(str(tmp_path / "blender.exe"), str(prefix), windows=True) == str(prefix / "bin" / "python.exe")
    assert E.own_python(str(blender), str(tmp_path / "nowhere"), windows=False) == ""
    assert E.env_python("/u/env", windows=False) == "/u/env/bin/python"
    assert E.env_python("C:\\u\\env", windows=True).endswith(os.path.join("Scripts", "python.exe"))


def test_inspect_python_real_interpreters(tmp_path):
    info = E.inspect_python(sys.executable)
    assert info.version[:2] in E.SUPPORTED_PYTHONS and info.short == "%d.%d" % sys.version_info[:2]
    for path, shown in ((PY313, "3.13"), (PY27, "2.7")):
        if not os.path.isfile(path):
            continue
        with pytest.raises(E.SetupError) as e:
            E.inspect_python(path)
        assert e.value.code == "python_unsupported"
        assert f"Python {shown}" in e.value.message and "needs Python 3.11 or 3.12" in e.value.message
        assert "Python for the backend" in e.value.hint
    with pytest.raises(E.SetupError) as e:
        E.inspect_python(str(tmp_path / "missing" / "python3"))
    assert e.value.code == "python_missing"
    not_python = shutil.which("true") or shutil.which("ls")
    with pytest.raises(E.SetupError) as e:
        E.inspect_python(not_python)
    assert e.value.code == "python_broken" and "not a working Python" in e.value.message
    # a Python without venv/ensurepip (Debian's python3 without python3-venv)
    with pytest.raises(E.SetupError) as e:
        E.parse_python_check("/usr/bin/python3", 1, "3.12.3\nModuleNotFoundError: No module named 'ensurepip'\n")
    assert e.value.code == "python_no_venv" and "python3-venv" in e.value.hint


# ------------------------------------------------------------------- GPU
SMI_QUERY = "NVIDIA GeForce RTX 4090, 24564, 570.86.15, 8.9\nNVIDIA GeForce RTX 4090, 24564, 570.86.15, 8.9\n"
SMI_BANNER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 570.86.15              Driver Version: 570.86.15      CUDA Version: 12.8     |
|-----------------------------------------+------------------------+----------------------+
"""


def test_nvidia_parsing():
    driver, gpus = E.parse_nvidia_smi_query(SMI_QUERY)
    assert driver == "570.86.15" and len(gpus) == 2
    assert gpus[0] == E.Gpu("NVIDIA GeForce RTX 4090", 24564, (8, 9))
    assert E.parse_nvidia_smi_query("Tesla T4, 15360, 535.104.05\n")[1][0].compute_capability is None
    assert E.parse_nvidia_smi_query("No devices were found\n") == ("", ())
    assert E.parse_cuda_banner(SMI_BANNER) == (12, 8)
    assert E.cuda_from_driver_int(12080) == (12, 8) and E.cuda_from_driver_int(11040) == (11, 4)
    assert E.cuda_from_driver_int(0) is None

    class Fake:  # canned nvidia-smi runs (no GPU here); libcuda answers first when present
        def __init__(self, out, rc=0):
            self.stdout, self.returncode = out, rc

    def run(cmd, **_kw):
        return Fake(SMI_QUERY if len(cmd) > 1 else SMI_BANNER)

    old = shutil.which
    try:
        shutil.which = lambda name: "/usr/bin/nvidia-smi" if name == "nvidia-smi" else old(name)
        nv = E.detect_nvidia(run=run, cuda_version=lambda: None)
    finally:
        shutil.which = old
    assert nv is not None and nv.cuda == (12, 8) and nv.driver == "570.86.15"
    assert nv.text == "NVIDIA GeForce RTX 4090 (+1), driver 570.86.15, CUDA 12.8"
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
        assert E.detect_nvidia() is None  # this machine: no driver, no GPU


def nv(cuda, cc=(8, 9), driver="570.86"):
    return E.Nvidia(driver, cuda, (E.Gpu("GPU", 8000, cc),))


def test_cuda_build_follows_the_driver():
    assert E.pick_cuda_build(nv((12, 8))).tag == "cu128"
    assert E.pick_cuda_build(nv((13, 0))).tag == "cu128"
    assert E.pick_cuda_build(nv((12, 7))).tag == "cu126"
    assert E.pick_cuda_build(nv((12, 4))).tag == "cu124"
    assert E.pick_cuda_build(nv((12, 2))).tag == "cu121"
    assert E.pick_cuda_build(nv((11, 8))).tag == "cu118"
    assert E.pick_cuda_build(nv((12, 8), cc=(6, 1))).tag == "cu126"   # Pascal: not in cu128
    assert E.pick_cuda_build(nv((12, 8), cc=(12, 0))).tag == "cu128"  # Blackwell
    with pytest.raises(E.SetupError) as e:
        E.pick_cuda_build(nv((11, 4), driver="470.42"))
    assert e.value.code == "driver_too_old"
    assert "470.42 runs CUDA up to 11.4" in e.value.message and "520.61" in e.value.hint
    assert "PyTorch: CPU" in e.value.hint
    with pytest.raises(E.SetupError) as e:  # a Blackwell card on a driver older than CUDA 12.8
        E.pick_cuda_build(nv((12, 6), cc=(12, 0), driver="560.35"))
    assert e.value.code == "driver_too_old" and "CUDA 12.8" in e.value.message and "570.26" in e.value.hint
    with pytest.raises(E.SetupError) as e:
        E.pick_cuda_build(E.Nvidia("550.1", None, ()))
    assert e.value.code == "driver_unknown"


def test_choose_torch():
    c = E.choose_torch("linux-x64", None)
    assert (c.variant, c.tag, c.index_url, c.requirement) == ("cpu", "cpu", E.PYTORCH_INDEX + "cpu", "torch")
    assert "no NVIDIA GPU" in c.reason and c.label == "CPU only"
    c = E.choose_torch("windows-x64", nv((12, 8)), default_requirement="torch>=2.4")
    assert (c.variant, c.tag, c.index_url, c.requirement) == ("cuda", "cu128", E.PYTORCH_INDEX + "cu128", "torch>=2.4")
    assert "driver 570.86" in c.reason and c.label == "CUDA (cu128)"
    c = E.choose_torch("macos-arm64", None)
    assert (c.variant, c.index_url) == ("mps", "")  # PyPI's macOS wheels have MPS
    # overrides: CPU on a GPU machine, pip's own configuration, a pinned version, a custom index
    c = E.choose_torch("linux-x64", nv((12, 8)), variant="cpu", source="pip", requirement="torch==2.13.0")
    assert (c.variant, c.index_url, c.requirement) == ("cpu", "", "torch==2.13.0")
    c = E.choose_torch("linux-x64", None, source="custom", custom_index=" https://mirror.studio/torch-cpu ")
    assert c.index_url == "https://mirror.studio/torch-cpu"
    assert c.key() != E.choose_torch("linux-x64", None).key()
    for kw in ({"variant": "cuda"}, {"variant": "mps"}, {"source": "custom", "custom_index": "mirror"}):
        with pytest.raises(E.SetupError):
            E.choose_torch("linux-x64", None, **kw)
    with pytest.raises(E.SetupError) as e:
        E.choose_torch("linux-x64", nv((11, 2)))
    assert e.value.code == "driver_too_old"


# ------------------------------------------------------------ disk, env
def test_disk_space_check(tmp_path):
    free = shutil.disk_usage(tmp_path).free  # noisy (others write meanwhile): only margins are compared
    assert E.check_disk(str(tmp_path / "not" / "yet"), 1000) > 1000  # a folder still to be made: its drive
    with pytest.raises(E.SetupError) as e:
        E.check_disk(str(tmp_path), free + 5 * 10**9)
    assert e.value.code == "disk_full" and "needs about" in e.value.message
    assert f"{(free + 5e9) / 1e9:.1f} GB" in e.value.message and "Free at least" in e.value.hint
    with pytest.raises(E.SetupError) as e:  # a tiny quota
        E.check_disk(str(tmp_path), 2 * 10**9, free=300 * 10**6)
    assert "needs about 2.0 GB free" in e.value.message and "has 0.3 GB" in e.value.message
    full = E.required_bytes(["venv", "pip", "torch", "backend"], "cpu")
    assert 1.5e9 < full < 2.5e9  # the CPU environment measured here: 1.42 GB installed + downloads
    assert E.required_bytes(["backend"], "cpu") < full < E.required_bytes(["venv", "torch", "backend"], "cuda")
    assert E.required_bytes([], "cpu") == 0


def test_child_env_keeps_everything_inside_the_user_folder(tmp_path):
    base = {"PATH": "/usr/bin", "PYTHONPATH": "/blender/scripts", "PYTHONHOME": "/blender/python",
            "PIP_TARGET": "/elsewhere", "VIRTUAL_ENV": "/other", "PIP_INDEX_URL": "https://mirror.studio/simple",
            "HTTPS_PROXY": "http://proxy:3128"}
    env = E.child_env(base, str(tmp_path))
    for k in ("PYTHONPATH", "PYTHONHOME", "PIP_TARGET", "VIRTUAL_ENV"):
        assert k not in env
    assert env["PYTHONNOUSERSITE"] == "1" and env["PIP_USER"] == "0"
    assert env["PIP_CACHE_DIR"].startswith(str(tmp_path)) and env["TMPDIR"].startswith(str(tmp_path))
    # a studio's mirror and proxy still apply
    assert env["PIP_INDEX_URL"] == base["PIP_INDEX_URL"] and env["HTTPS_PROXY"] == base["HTTPS_PROXY"]


# ------------------------------------------------------------ stamp, plan
def target(wheel_sha="a" * 64, torch=CPU_TORCH, version=(3, 11, 7)):
    return E.Target(E.PythonInfo("/usr/bin/python3.11", version), "/x/neural_atlas-0.1.0-py3-none-any.whl",
                    wheel_sha, torch)


def good_probe(env_dir, **kw):
    d = {"python": "3.11.7", "pip": "26.3", "torch": "2.13.0+cpu", "missing": [], "errors": {},
         "backend": "0.1.0", "backend_file": os.path.join(env_dir, "lib", "site-packages", "backend", "__init__.py"),
         "device": {"type": "cpu", "name": "CPU"}}
    d.update(kw)
    return d


def complete_stamp(t):
    return {"format": 1, "complete": True, "verified": {"torch": "2.13.0+cpu"},
            "steps": {"venv": {"python_version": "3.11.7"}, "pip": {}, "torch": {"key": t.torch.key()},
                      "backend": {"key": t.backend_key()}}}


def test_stamp_marks_steps_atomically(tmp_path):
    env = str(tmp_path)
    assert E.read_stamp(env) == {}
    st = {"python_version": "3.11.7", "steps": {}}
    E.mark_step(env, st, "venv", {"python_version": "3.11.7"})
    E.mark_step(env, st, "torch", None)  # about to install torch
    back = E.read_stamp(env)
    assert back["steps"] == {"venv": {"python_version": "3.11.7"}} and back["running"] == "torch"
    assert back["complete"] is False and not E.ready(back)
    E.mark_step(env, st, "torch", {"key": CPU_TORCH.key()})
    back = E.read_stamp(env)
    assert "running" not in back and back["steps"]["torch"]["key"]["requirement"] == "torch==2.13.0"
    assert not [n for n in os.listdir(env) if n.endswith(".tmp")]
    with open(E.stamp_path(env), "w") as f:
        f.write("{ broken")
    assert E.read_stamp(env) == {}  # a damaged stamp = no stamp: everything is redone


def test_plan(tmp_path):
    env = str(tmp_path)
    t = target()
    full = ["venv", "pip", "torch", "backend"]
    assert E.plan(t, {}, None, env) == full
    st = complete_stamp(t)
    assert E.plan(t, st, good_probe(env), env) == []  # complete and current: reuse
    assert E.plan(t, st, None, env) == full  # its python does not run any more
    assert E.plan(t, st, good_probe(env), env, repair=True) == ["backend"]
    assert E.plan(target(wheel_sha="b" * 64), st, good_probe(env), env) == ["backend"]  # a new add-on version
    other = E.TorchChoice("cuda", "cu128", "torch>=2.4", E.PYTORCH_INDEX + "cu128", "")
    assert E.plan(target(torch=other), st, good_probe(env), env) == ["torch"]
    assert E.plan(target(version=(3, 12, 1)), st, good_probe(env), env) == full  # another Python picked
    assert E.plan(t, st, good_probe(env, pip="23.2.1"), env) == ["pip"]
    assert E.plan(t, st, good_probe(env, errors={"torch": "ImportError: libtorch.so"}), env) == ["torch", "backend"]
    assert E.plan(t, st, good_probe(env, missing=["cv2"], errors={"cv2": "x"}), env) == ["backend"]
    elsewhere = good_probe(env, backend_file="/home/me/src/backend/__init__.py")  # not from this environment
    assert E.plan(t, st, elsewhere, env) == ["backend"]
    interrupted = json.loads(json.dumps(st))
    interrupted["steps"].pop("torch")
    interrupted.update(complete=False, running="torch")
    assert E.plan(t, interrupted, good_probe(env), env) == ["torch"]


def test_probe_parsing_and_problems(tmp_path):
    env = str(tmp_path)
    out = "some warning\n" + E.PROBE_MARK + json.dumps(good_probe(env)) + "\n"
    p = E.parse_probe(out)
    assert p and p["torch"] == "2.13.0+cpu" and E.probe_ok(p, env)
    assert E.parse_probe("Traceback ...\n") is None
    assert E.probe_problem(p, CPU_TORCH) is None
    cuda = E.TorchChoice("cuda", "cu128", "torch", E.PYTORCH_INDEX + "cu128", "")
    old = good_probe(env, torch="2.7.0+cu128", torch_cuda="12.8", cuda_available=False, torch_warnings=[
        "CUDA initialization: The NVIDIA driver on your system is too old (found version 11040)."])
    e = E.probe_problem(old, cuda, nv((11, 4), driver="470.42"))
    assert e is not None and e.code == "driver_too_old" and "470.42" in e.message and "Update the NVIDIA" in e.hint
    e = E.probe_problem(good_probe(env, errors={"torch": "OSError: [WinError 126] fbgemm.dll"}), CPU_TORCH)
    assert e is not None and "PyTorch does not load" in e.message and "Repair" in e.hint


# ------------------------------------------------------------- pip output
PIP_OUTPUT = """Looking in indexes: https://download.pytorch.org/whl/cu128
Collecting torch>=2.4
  Downloading https://download.pytorch.org/whl/cu128/torch-2.7.1%2Bcu128-cp311-cp311-manylinux_2_28_x86_64.whl (1097.2 MB)
Progress 0 of 1097200000
Progress 548600000 of 1097200000
Progress 1097200000 of 1097200000
Collecting nvidia-cudnn-cu12==9.7.1.26
  Downloading nvidia_cudnn_cu12-9.7.1.26-py3-none-manylinux_2_27_x86_64.whl (571.0 MB)
Progress 571000000 of 571000000
Requirement already satisfied: filelock in ./env/lib/python3.11/site-packages (3.16.1)
Installing collected packages: nvidia-cudnn-cu12, torch
Successfully installed nvidia-cudnn-cu12-9.7.1.26 torch-2.7.1+cu128
"""


def test_pip_progress_from_real_output_lines():
    p = E.PipProgress(expected_bytes=3_500_000_000)
    fractions, details = [], []
    for line in PIP_OUTPUT.splitlines():
        E.pip_line(p, line)
        fractions.append(p.fraction)
        details.append(p.detail)
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] == 0.9
    assert "Downloading torch-2.7.1%2Bcu128-cp311-cp311-manylinux_2_28_x86_64.whl (549 / 1097 MB)" in details
    assert any(d.startswith("Installing 2 packages (unpacking nvidia-cudnn-cu12, torch") for d in details)
    assert p.done_bytes == 1097200000 + 571000000 and p.errors == []
    assert details[-1] == "Installed"


def test_classify_failures():
    refused = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError('<...>: Failed "
               "to establish a new connection: [Errno 111] Connection refused')': /simple/torch/\n"
               "ERROR: Could not find a version that satisfies the requirement torch>=2.4 (from versions: none)\n"
               "ERROR: No matching distribution found for torch>=2.4\n")
    e = E.classify_failure(refused, 1, what="PyTorch (CPU only)", index_urls=["http://127.0.0.1:9/simple"],
                           log_path="/u/logs/setup.log")
    assert e.code == "network" and "127.0.0.1:9" in e.message and "unreachable" in e.message
    assert "/u/logs/setup.log" in e.hint
    dns = "WARNING: Retrying ... 'NameResolutionError(\"...: Failed to resolve 'pypi.org' ([Errno -3] Temporary " \
          "failure in name resolution)\")'\n"
    assert E.classify_failure(dns, 1, what="x").code == "network"
    tls = "Could not fetch URL https://pypi.org/simple/torch/: There was a problem confirming the ssl certificate: " \
          "HTTPSConnectionPool(host='pypi.org', port=443): ... (Caused by SSLError(SSLCertVerificationError(1, " \
          "'[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed')))\n"
    assert E.classify_failure(tls, 1, what="x", index_urls=["https://pypi.org/simple"]).code == "network_tls"
    disk = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device\n"
    assert E.classify_failure(disk, 1, what="PyTorch").code == "disk_full"
    none = ("ERROR: Could not find a version that satisfies the requirement torch==9.9 (from versions: 2.4.0)\n"
            "ERROR: No matching distribution found for torch==9.9\n")
    e = E.classify_failure(none, 1, what="PyTorch", python="3.12", platform_name="linux-x64")
    assert e.code == "no_build" and "torch==9.9" in e.message and "Python 3.12 on linux-x64" in e.message
    locked = "ERROR: Could not install packages due to an OSError: [WinError 32] The process cannot access the file\n"
    assert E.classify_failure(locked, 1, what="the backend").code == "permission"
    other = "ERROR: something new\n"
    e = E.classify_failure(other, 2, what="the backend")
    assert e.code == "install_failed" and "exit code 2" in e.message and "something new" in e.message


# ------------------------------------------------- the installer, for real
def _quiet_env(tmp_path):
    """A parent environment whose HOME and TMPDIR must stay empty: the setup writes
    nothing outside the user folder."""
    home, tmp = tmp_path / "home", tmp_path / "systmp"
    home.mkdir()
    tmp.mkdir()
    env = dict(os.environ, HOME=str(home), TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))
    # pip's user agent runs `rustc --version`; a rustup proxy on PATH then makes ~/.rustup
    # (an artist with rustup has it already). Not ours to judge: keep rustup off PATH here.
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if ".cargo" not in p)
    return env, home, tmp


def config(user, backend_wheel, **kw):
    d = dict(user_dir=str(user), base_python=sys.executable, wheel=backend_wheel, torch=CPU_TORCH,
             platform_name=E.platform_key(), helper_python=sys.executable)
    d.update(kw)
    return I.SetupConfig(**d)


def test_refusals_before_anything_is_installed(tmp_path, wheel):
    user = tmp_path / "user"
    for kw, code, text in (
            ({"required_bytes": 10**15}, "disk_full", "needs about 1000000.0 GB"),
            ({"online": False}, "offline", "online access is off"),
            ({"base_python": PY313}, "python_unsupported", "needs Python 3.11 or 3.12"),
            ({"wheel": str(tmp_path / "missing.whl")}, "no_wheel", "missing from the extension"),
            ({"platform_name": "macos-x64"}, "unsupported_platform", "Intel Macs")):
        if kw.get("base_python") == PY313 and not os.path.isfile(PY313):
            continue
        job = I.start_setup(config(user, wheel, **kw))
        lines = []
        st = job.run(on_progress=lambda s: lines.append(s.line()), timeout=120)
        assert (st.state, st.code) == ("failed", code), (kw, st.message)
        assert text in st.message and st.hint, st.message
        assert lines and lines[0].endswith("Checking this machine")
        assert not os.path.exists(os.path.join(user, E.ENV_DIRNAME))  # nothing made
        assert not os.path.exists(user / "tmp")  # the scratch folder goes with the job
    log = open(config(user, wheel).log_path, encoding="utf-8").read()
    assert log.count(" setup started") == 4 + os.path.isfile(PY313) and "ERROR: Not enough disk space" in log


def test_unreachable_index_then_cancel_mid_pip(tmp_path, wheel):
    """A real venv, a real pip against an index that refuses connections (clear message,
    nothing marked installed), then a real pip interrupted by Cancel."""
    env, home, systmp = _quiet_env(tmp_path)
    user = tmp_path / "user"
    unreachable = E.TorchChoice("cpu", "cpu", "neural-atlas-unreachable-probe==1.0", "http://127.0.0.1:9/simple", "")
    job = I.start_setup(config(user, wheel, torch=unreachable, pip_args=("--retries", "1")), base_env=env)
    seen = []
    st = job.run(on_progress=lambda s: seen.append(s.step), timeout=400)
    assert (st.state, st.code) == ("failed", "network"), (st.message, st.hint)
    assert "the package index (127.0.0.1:9) is unreachable" in st.message and "already installed is kept" in st.hint
    assert [s for i, s in enumerate(seen) if i == 0 or seen[i - 1] != s][:4] == ["check", "venv", "pip", "torch"]
    env_dir = os.path.join(user, E.ENV_DIRNAME)
    stamp = E.read_stamp(env_dir)
    assert set(stamp["steps"]) == {"venv", "pip"} and stamp["running"] == "torch" and not E.ready(stamp)

    # Cancel while pip works on the torch step: pip is interrupted, the environment stays unused
    job = I.start_setup(config(user, wheel), base_env=env)
    end = time.monotonic() + 300
    while not (job.status.step == "torch" and job.pid is not None) and job.status.active:
        assert time.monotonic() < end
        job.poll()
        time.sleep(0.05)
    assert job.status.active, job.status.message
    pid = job.pid
    job.cancel()
    while job.status.active:
        assert time.monotonic() < end
        job.poll()
        time.sleep(0.05)
    st = job.status
    assert st.state == "cancelled" and "continues where it stopped" in st.hint and job.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # gone (and reaped)
    stamp = E.read_stamp(env_dir)
    assert stamp["running"] == "torch" and "torch" not in stamp["steps"] and not E.ready(stamp)
    log = open(st.log_path, encoding="utf-8").read()
    assert "cancel requested" in log and "cancelled: Setup cancelled" in log
    # nothing was written outside the user folder (pip's cache and temporary files included)
    assert os.listdir(home) == [] and os.listdir(systmp) == []
    assert not os.path.exists(user / "tmp")
