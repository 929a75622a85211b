"""Builds fastnorm._C: CPU kernels always, CUDA kernels when torch is a CUDA build and nvcc exists.

Environment overrides:
  FASTNORM_FORCE_CPU=1         build the CPU kernels only, even with a CUDA torch
  FASTNORM_FORCE_CUDA=1        fail unless the CUDA kernels are built
  TORCH_CUDA_ARCH_LIST         CUDA architectures (default without a visible GPU: 8.0;9.0)
  FASTNORM_CPU_CAPABILITY      DEFAULT | AVX2 | AVX512 | AVX512_BF16 vector ISA of the CPU kernels
                               (default: what torch reports for the build machine)
  MAX_JOBS                     parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = os.path.dirname(os.path.abspath(__file__))

NVCC_FLAGS = [
    "-O3", "--expt-relaxed-constexpr", "-lineinfo",
    # A register spill in any kernel fails the build (tests/test_build.py shows it does).
    "-Xptxas=--warn-on-spills,--warning-as-error",
]


def read_version():
    with open(os.path.join(ROOT, "fastnorm", "version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def want_cuda():
    if env_flag("FASTNORM_FORCE_CPU"):
        return False
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    # Decided by the torch build and the compiler, never by a visible GPU.
    ok = torch.version.cuda is not None and bool(nvcc)
    if env_flag("FASTNORM_FORCE_CUDA") and not ok:
        sys.exit(
            "FASTNORM_FORCE_CUDA=1 but CUDA cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, nvcc={'found' if nvcc else 'not found'}"
        )
    return ok


def cpu_has(flag):
    """Whether the build machine's CPU lists `flag` in /proc/cpuinfo (elsewhere: no)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return flag in line.split()
    except OSError:
        pass
    return False


def cpu_capability_flags():
    """Vector ISA for at::vec in the CPU kernels (torch's own kernels dispatch at run time;
    ours are built for the build machine, like -march=native). AVX512_BF16: AVX512 plus the
    instruction that rounds float32 to bfloat16 (csrc/cpu/lanes.h), where the machine has it."""
    cap = os.environ.get("FASTNORM_CPU_CAPABILITY", "").upper()
    if not cap:
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except Exception:
            cap = "DEFAULT"
        if cap.startswith("AVX512") and cpu_has("avx512_bf16"):
            cap = "AVX512_BF16"
    if cap.startswith("AVX512"):
        flags = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                 "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
        if cap == "AVX512_BF16":
            return cap, flags + ["-mavx512bf16", "-DFASTNORM_AVX512_BF16"]
        return "AVX512", flags
    if cap == "AVX2":
        return "AVX2", ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    return "DEFAULT", ["-DCPU_CAPABILITY=DEFAULT"]


def nvidia_wheel_includes():
    """CUDA headers shipped in the nvidia-* wheels next to torch (cusparse.h and friends)."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(site, pattern))):
                if os.path.isdir(d) and d not in dirs:
                    dirs.append(d)
    return dirs


def cudart_library_dirs():
    """Where the linker finds libcudart.so: torch's CUDA_HOME guess (from the nvcc on PATH)
    can miss the toolkit's lib64 when nvcc is a wrapper script."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME, "/usr/local/cuda"]
    for home in filter(None, homes):
        for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
            d = os.path.join(home, sub)
            if os.path.exists(os.path.join(d, "libcudart.so")):
                return [d]
    return []


def cuda_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    if torch.cuda.is_available():
        return None  # torch picks the visible GPUs' architectures
    # No GPU visible: torch's builder would fail; build for Ampere and Hopper.
    return "8.0;9.0"


def process_libstdcxx():
    """The libstdc++ this process (torch) runs with, where one is loaded: named on the link
    line, it resolves the extension's C++ runtime references before any static copy that the
    compiler's defaults or flags would add (-static-libstdc++, or a compiler with no shared
    runtime of its own, as /opt/gcc on one GPU machine's image). Two copies in one process
    crash the first error message that formats a number: the copy's stream code looks up
    locale facets registered by the other."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libstdc++.so" in line}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.isfile(p))[:1]


def extension():
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = want_cuda() and bool(cuda_sources)
    cap, cap_flags = cpu_capability_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp") + glob.glob("csrc/autograd/*.cpp"))
    macros = [
        ("FASTNORM_CPU_CAPABILITY", f'"{cap}"'),
        ("FASTNORM_VERSION", f'"{read_version()}"'),
        ("FASTNORM_TORCH_VERSION", f'"{torch.__version__}"'),
    ]
    # No -std flag: torch.utils.cpp_extension adds the standard this torch needs (C++17 or 20).
    # -fno-math-errno: sqrt and friends vectorize (nothing here reads errno).
    cxx = ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-unknown-pragmas"] + cap_flags
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"] + process_libstdcxx())
    if not with_cuda:
        return CppExtension("fastnorm._C", sources, define_macros=macros,
                            extra_compile_args={"cxx": cxx}, **kwargs)
    archs = cuda_arch_list()
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    macros.append(("FASTNORM_WITH_CUDA", None))
    macros.append(("FASTNORM_CUDA_ARCHS", f'"{os.environ.get("TORCH_CUDA_ARCH_LIST", "visible")}"'))
    sources += cuda_sources
    nvcc = list(NVCC_FLAGS)
    kwargs["include_dirs"] += nvidia_wheel_includes()
    kwargs["library_dirs"] = cudart_library_dirs()
    return CUDAExtension("fastnorm._C", sources, define_macros=macros,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


setup(
    name="fastnorm",
    packages=find_packages(include=["fastnorm", "fastnorm.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
