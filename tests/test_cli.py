"""The command line as a user meets it: usage errors are one line and exit status 2, and
``bench`` writes its JSON, markdown and plot."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

import fastnorm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fastnorm", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


def assert_usage_error(r, message):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.parametrize("args,message", [
    (["--filter", "no-such-case"], "no case matches --filter no-such-case in the --quick suite"),
    (["--batch", "0"], "--batch 0: the batch must be a positive number"),
    (["--json", "/nonexistent-dir/r.json"], "cannot write the JSON results to /nonexistent-dir/r.json: no directory"),
    (["--markdown", "/nonexistent-dir/r.md"], "cannot write the markdown table to /nonexistent-dir/r.md"),
    (["--plot", "/nonexistent-dir/r.png"], "cannot write the plot to /nonexistent-dir/r.png"
     if HAS_MATPLOTLIB else "--plot needs matplotlib"),
] + ([] if fastnorm.backends()["cuda"] else [(["--device", "cuda"], "--device cuda: no GPU here")]))
def test_bench_usage_errors(args, message):
    """Each is found before any case runs: nothing is timed, nothing printed on stdout."""
    r = run("bench", "--quick", *(["--device", "cpu"] if "--device" not in args else []), *args)
    assert_usage_error(r, f"fastnorm bench: {message}")
    assert r.stdout == "", r.stdout


@pytest.mark.parametrize("args,message", [
    (["benchmark"], "usage: python -m fastnorm {info,check,bench,profile}"),
    (["bench", "--quick", "--suite", "batch_norm", "--filter", "materialize"],
     "fastnorm bench: no case matches --filter materialize --suite batch_norm in the --quick suite"),
    (["bench", "--dtype", "bfloat16", "--layout", "channels_last", "--filter", "1d"],
     "fastnorm bench: no case matches --filter 1d --dtype bfloat16 --layout channels_last"),
    (["bench", "--batch", "-4"], "fastnorm bench: --batch -4: the batch must be a positive number"),
    (["bench", "--min-run-time", "0"], "fastnorm bench: --min-run-time 0.0: must be a positive number of seconds"),
    (["check", "--ops", "layer_norm"], "fastnorm check: unknown op layer_norm; choose from"),
    (["profile", "--shape", "3xa"], "fastnorm profile: bad --shape '3xa'"),
])
def test_usage_errors_in_process(args, message, capsys):
    """The same mechanism for every command (fastnorm._cli.UsageError), without a process
    per case: one line on stderr, status 2."""
    from fastnorm.__main__ import main

    if args[0] == "bench" and "--device" not in args:
        args = args + ["--device", "cpu"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err


def test_bench_output_path_is_a_directory(tmp_path, capsys):
    from fastnorm.__main__ import main

    assert main(["bench", "--quick", "--device", "cpu", "--json", str(tmp_path)]) == 2
    assert f"cannot write the JSON results to {tmp_path}: it is a directory" in capsys.readouterr().err


def test_bench_plot_without_matplotlib(tmp_path):
    """Without matplotlib, --plot is refused before the benchmark runs, in one line."""
    fake = tmp_path / "no_matplotlib"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(fake), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "r.json"
    r = run("bench", "--quick", "--device", "cpu", "--json", out, "--plot", tmp_path / "r.png", env=env)
    assert_usage_error(r, "fastnorm bench: --plot needs matplotlib: pip install matplotlib")
    assert r.stdout == "" and not out.exists() and not (tmp_path / "r.png").exists()


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_bench_plot_unknown_format(tmp_path, capsys):
    from fastnorm.__main__ import main

    assert main(["bench", "--quick", "--device", "cpu", "--plot", str(tmp_path / "r.xyz")]) == 2
    assert f"fastnorm bench: --plot {tmp_path / 'r.xyz'}: unknown image format .xyz" in capsys.readouterr().err


def test_bench_quick_writes_every_output(tmp_path):
    """A real quick run: the JSON names mode, commit and torch; the markdown has the table;
    the plot is a PNG (where matplotlib is installed)."""
    import torch

    paths = {k: tmp_path / f"r.{k}" for k in ("json", "md", "png")}
    args = ["bench", "--quick", "--device", "cpu", "--min-run-time", "0.01", "--json", paths["json"],
            "--markdown", paths["md"]] + (["--plot", paths["png"]] if HAS_MATPLOTLIB else [])
    r = run(*args)
    assert r.returncode == 0, r.stderr
    data = json.loads(paths["json"].read_text())
    assert data["mode"] == "plain" and data["build"]["commit"] and data["build"]["torch"] == torch.__version__
    assert data["results"] and data["weight_norm"]
    assert "| case | dtype | layout |" in paths["md"].read_text()
    if HAS_MATPLOTLIB:
        assert paths["png"].read_bytes()[:8] == PNG_SIGNATURE
        assert f"plot: {paths['png']}" in r.stdout


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="needs matplotlib")
def test_plot_from_a_results_dict(tmp_path):
    """The plot takes the results as the JSON holds them, older files' missing fields too."""
    from fastnorm._plot import plot_speedups

    def bn(name, device, dtype, layout, fwd, fwd_bwd):
        return {"name": name, "device": device, "dtype": dtype, "layout": layout, "group": "resnet50 b8",
                "speedup": {"torch fwd": fwd, "torch fwd+bwd": fwd_bwd}}

    data = {"results": [bn("a", "cpu", "float32", "contiguous", 2.0, 1.5),
                        bn("b", "cpu", "bfloat16", "channels_last", 0.5, 0.8),
                        bn("a", "cuda", "float32", "contiguous", 3.0, float("nan"))],
            "weight_norm": [{"name": "layer", "device": "cpu", "dtype": "float32",
                             "ratios": {"x vs torch fwd+bwd": 1.1}}]}
    for path in (tmp_path / "p.png", tmp_path / "p.svg"):
        plot_speedups(data, path)
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE
    assert b"<svg" in (tmp_path / "p.svg").read_bytes()[:500]


def test_bench_model_suite_writes_its_results(tmp_path, capsys):
    from fastnorm import bench

    out = tmp_path / "models.json"
    assert bench.main(["--suite", "models", "--quick", "--device", "cpu", "--filter", "mlp", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["models"]] == ["mlp"] and data["results"] == [] and data["weight_norm"] == []
    assert data["mode"] == "plain" and data["models"][0]["speedup"]["fastnorm"] > 0
    assert "### models, cpu" in capsys.readouterr().out
