"""The build: what it contains, its command line, and the nvcc spill check."""
import ast
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ["batch_norm_stats", "batch_norm_train", "batch_norm_elemt", "batch_norm_backward",
       "batch_norm_backward_reduce", "batch_norm_backward_elemt"]


def test_version_and_backends():
    from fastnorm.version import __version__

    assert fastnorm.__version__ == __version__
    b = fastnorm.backends()
    assert b["cpu"] is True and b["cpu_capability"] in ("DEFAULT", "AVX2", "AVX512", "AVX512_BF16")
    assert b["cuda"] == (b["cuda_compiled"] and torch.cuda.is_available())
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{op}", "CPU")


@pytest.mark.skipif(torch.version.cuda is None or shutil.which("nvcc") is None
                    or os.environ.get("FASTNORM_FORCE_CPU") == "1",
                    reason="needs a CUDA build of torch and nvcc")
def test_cuda_build_contains_the_cuda_kernels():
    b = fastnorm.backends()
    assert b["cuda_compiled"], "torch is a CUDA build and nvcc exists, but the CUDA kernels were not built"
    assert set(b["cuda_arch"]) >= {"8.0", "9.0"} or os.environ.get("TORCH_CUDA_ARCH_LIST")
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{op}", "CUDA"), op


def _nvcc_flags():
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "NVCC_FLAGS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no NVCC_FLAGS")


SPILLING = r"""
// 64 values live at once with at most 32 registers per thread: ptxas must spill.
__global__ void __launch_bounds__(1024, 2) spills(float* out, const float* in) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) v[i] = in[threadIdx.x + i * 1024];
  float s = 0;
#pragma unroll
  for (int i = 0; i < 64; ++i)
#pragma unroll
    for (int j = 0; j < 64; ++j) s += v[i] * v[j] * float(i ^ j);
  out[threadIdx.x] = s;
}
"""
FITTING = r"""
__global__ void __launch_bounds__(256) fits(float* out, const float* in) { out[threadIdx.x] = 2 * in[threadIdx.x]; }
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_nvcc_flags_fail_the_build_on_register_spills(tmp_path):
    flags = _nvcc_flags()
    assert any("--warn-on-spills" in f and "--warning-as-error" in f for f in flags)

    def compile(src):
        path = tmp_path / "k.cu"
        path.write_text(src)
        return subprocess.run(["nvcc", *flags, "-arch=sm_80", "-c", str(path), "-o", str(tmp_path / "k.o")],
                              capture_output=True, text=True, timeout=300)

    ok = compile(FITTING)
    assert ok.returncode == 0, ok.stderr
    spilled = compile(SPILLING)
    assert spilled.returncode != 0 and "spill" in spilled.stderr.lower(), spilled.stderr


def _run(*args):
    return subprocess.run([sys.executable, "-m", "fastnorm", *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


def test_info_command():
    r = _run("info")
    assert r.returncode == 0, r.stderr
    assert f"fastnorm {fastnorm.__version__}" in r.stdout and "backends:" in r.stdout


def test_check_command():
    r = _run("check")
    assert r.returncode == 0, r.stdout + r.stderr
    for op in ("batch_norm", "weight_norm", "mean_only", "sync"):
        assert any(line.startswith(op) for line in r.stdout.splitlines()), (op, r.stdout)
    assert "196/196 cases match torch" in r.stdout or torch.cuda.is_available(), r.stdout


def test_check_command_fails_on_a_wrong_op(monkeypatch, capsys):
    """A weight norm off by 1% fails its cases, and check exits 1 naming them."""
    from fastnorm import check

    right = fastnorm.functional.weight_norm
    monkeypatch.setattr(fastnorm.functional, "weight_norm", lambda v, g, dim=0, **kw: right(v, g, dim, **kw) * 1.01)
    assert check.main(["--ops", "weight_norm", "--dtypes", "float32", "--devices", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL weight_norm cpu float32" in out and "0/5 cases match torch" in out


@pytest.mark.parametrize("args,message", [
    (["--ops", "layer_norm"], "unknown op layer_norm"),
    (["--dtypes", "int8"], "unknown dtype int8"),
    (["--devices", "tpu"], "unknown device tpu"),
] + ([] if torch.cuda.is_available() else [(["--devices", "cuda"], "no cuda device here")]))
def test_check_command_usage_errors(args, message):
    """A usage error is one line on stderr and exit status 2, not a traceback."""
    r = _run("check", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    r = _run("bench", "--quick", "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr
    import json

    data = json.loads(out.read_text())
    assert data["mode"] == "plain" and "mode plain" in data["header"] and "mode plain" in r.stdout
    assert data["build"]["commit"] != "" and data["build"]["cpu_capability"] == fastnorm.backends()["cpu_capability"]
    assert data["results"] and all(res["ms"]["fastnorm fwd"] > 0 for res in data["results"])
    assert all(res["speedup"]["torch fwd+bwd"] > 0 for res in data["results"])
    assert data["weight_norm"] and all(q > 0 for res in data["weight_norm"] for q in res["ratios"].values())
    assert "x vs torch fwd" in r.stdout


@pytest.mark.parametrize("mode", ["warm-allocator", "thp"])
def test_bench_modes_are_labelled(tmp_path, mode):
    """Any mode but the plain process is asked for, and named in the output and the results."""
    import json

    out = tmp_path / "bench.json"
    r = _run("bench", "--quick", "--device", "cpu", "--suite", "batch_norm", "--filter", "1d", "--mode", mode,
             "--json", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == mode and f"mode {mode}" in data["header"] and f"mode {mode}" in r.stdout
    assert "[1/1]" in r.stdout  # progress


def test_bench_ratio_pairs_rounds():
    """A ratio is the median of the per-round ratios, not the ratio of the medians: two of
    the three rounds agree on 0.5, the medians' ratio (5 / 3) would follow the odd round."""
    from fastnorm.bench import Timings

    t = object.__new__(Timings)
    t.rounds = {"a": [1.0, 5.0, 9.0], "b": [2.0, 3.0, 18.0]}
    assert t.ratio("a", "b") == 0.5  # the medians' ratio would be 5 / 3


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to read the extension's symbols")
def test_cxx_runtime_is_the_shared_one():
    """The extension uses the process's libstdc++, as torch does: a second, static copy linked
    into it crashed every error message that formats a number (one build on a GPU machine:
    std::ostream::_M_insert<long> ran from inside _C.so and reached a codecvt facet)."""
    from fastnorm import _C

    symbols = subprocess.run(["nm", "--defined-only", _C.__file__], capture_output=True, text=True).stdout
    dynamic = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True).stdout
    assert symbols or dynamic, "nm read no symbols from the extension"
    for runtime_member in ("_ZNSo9_M_insertIlEERSoT_", "_ZNKSt7codecvtIDsc11__mbstate_tE10do_unshiftERS0_PcS3_RS3_"):
        assert runtime_member not in symbols + dynamic, (
            f"{_C.__file__} defines {runtime_member}, a member of libstdc++ itself: the C++ runtime was linked "
            "statically (-static-libstdc++ in LDFLAGS or the compiler's defaults?); link it as a shared library")


def test_profile_command_op_cases(tmp_path):
    """profile: a Chrome trace and a table per implementation, fastnorm's ops named."""
    import json

    for op, shape, names in (("batch_norm", "4x8x6x6", ("fastnorm::batch_norm_train", "fastnorm::batch_norm_backward")),
                             ("weight_norm", "16x9", ("fastnorm::weight_norm",))):
        trace = tmp_path / f"{op}.json"
        r = _run("profile", "--op", op, "--shape", shape, "--steps", "1", "--layout", "channels_last",
                 "--trace", str(trace))
        assert r.returncode == 0, r.stderr
        assert "torch step:" in r.stdout and "fastnorm step:" in r.stdout, r.stdout
        for name in names:
            assert name in r.stdout, r.stdout
        events = json.loads(trace.read_text())["traceEvents"]
        assert any(e.get("name") == "fastnorm step" for e in events)


def test_profile_command_callable(tmp_path):
    """A user's module:function gives each implementation's step."""
    (tmp_path / "user_steps.py").write_text(
        "import torch, fastnorm\n"
        "def steps(impl, device, dtype):\n"
        "    m = (fastnorm.BatchNorm1d if impl == 'fastnorm' else torch.nn.BatchNorm1d)(5)\n"
        "    x = torch.randn(7, 5, dtype=dtype, device=device)\n"
        "    return lambda: m(x).sum().backward()\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = subprocess.run([sys.executable, "-m", "fastnorm", "profile", "--callable", "user_steps:steps", "--steps",
                        "1", "--trace", str(tmp_path / "t.json")], capture_output=True, text=True, timeout=600,
                       cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert "fastnorm::batch_norm_train" in r.stdout and "aten::native_batch_norm" in r.stdout, r.stdout


@pytest.mark.parametrize("args,message", [
    (["--shape", "3xa"], "bad --shape"),
    (["--device", "tpu"], "unknown --device"),
    (["--callable", "no_such_module:f"], "--callable no_such_module:f"),
    (["--trace", "/nonexistent-dir/t.json"], "cannot write the trace"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "no GPU here")]))
def test_profile_command_usage_errors(args, message):
    r = _run("profile", *args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
