"""tools/gpu_check.py, the Python half of the prepared GPU check: the offline install from wheels,
the test and benchmark summary (the shell script itself is run by its dry run, tools/GPU_CHECK.md)."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from tools import gpu_check


def make_wheel(folder: Path, name: str, version: str, requires=()) -> Path:
    """A pure-Python wheel of one module ``name`` whose ``VERSION`` is ``version``."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for n, text in files.items():
            zf.writestr(n, text)
    return path


def install(tmp_path: Path, requirements: str, wheels: Path) -> subprocess.CompletedProcess:
    req = tmp_path / "requirements.txt"
    req.write_text(requirements)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "install", "--requirements", str(req),
                           "--also", "--wheels", str(wheels), "--target", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=120)


def test_install_takes_only_what_is_missing_from_the_wheels(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "gpucheck_app", "1.0", requires=["gpucheck_dep>=2", "gpucheck_extra; extra == 'test'"])
    make_wheel(wheels, "gpucheck_dep", "1.0")
    make_wheel(wheels, "gpucheck_dep", "2.1")
    make_wheel(wheels, "pytest", "0.0.1")  # pytest is installed here: its wheel must stay unused
    proc = install(tmp_path, "# comment\ngpucheck_app>=1.0\npytest>=7\n", wheels)
    assert proc.returncode == 0, proc.stderr
    site = tmp_path / "site"
    # the app and the newest dependency that fits, one version each; no extras, nothing already there
    assert sorted(p.name for p in site.glob("*.dist-info")) == ["gpucheck_app-1.0.dist-info",
                                                                  "gpucheck_dep-2.1.dist-info"]
    check = subprocess.run([sys.executable, "-c", "import gpucheck_app, gpucheck_dep; print(gpucheck_dep.VERSION)"],
                           env={"PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "2.1", check.stderr
    # run again with the target on the path (as gpu_check.sh does): everything is there now
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "install", "--requirements",
                            str(tmp_path / "requirements.txt"), "--also", "--wheels", str(wheels), "--target", str(site)],
                           env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and "all present" in again.stdout, again.stdout + again.stderr


@pytest.mark.parametrize("requirement, message", [
    ("gpucheck_absent>=1", "gpucheck_absent>=1 missing and not among the wheels"),
    ("torch>=999", "install the torch build for this machine's CUDA first"),
])
def test_install_names_what_it_cannot_install(tmp_path, requirement, message):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    make_wheel(wheels, "gpucheck_dep", "1.0")
    proc = install(tmp_path, requirement + "\n", wheels)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not (tmp_path / "site").exists()


def test_summary_reads_junit_and_benchmark_rows_and_judges_the_targets(tmp_path):
    """A real pytest run's junit.xml and a real benchmark JSON, as gpu_check.sh leaves them."""
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir(), work.mkdir()
    (tmp_path / "test_demo.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='no GPU')\n"
        "def test_skipped(): pass\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_demo.py"),
                    "--junitxml", str(out / "junit.xml")], cwd=tmp_path, capture_output=True, timeout=60)
    from tools import benchmark

    bargs = benchmark.get_args_parser().parse_args(["--steps", "1", "--rounds", "1", "--warmup", "0", "--json",
                                                    str(work / "bench_default.json")])
    benchmark.main(bargs, ["--model", "deepmim_vit_tiny_patch4", "--input_size", "16", "--batch_size", "2",
                           "--decoder_depth", "1", "--device", "cpu"])
    info = json.loads((work / "bench_default.json").read_text())
    info["results"][0]["images_per_s"] /= 2  # the reference: half the default's speed
    (work / "bench_reference.json").write_text(json.dumps(info))
    (work / "parts.tsv").write_text("setup\t0\t3\t40\ntests\t0\t9\t150\nbench_reference\t0\t5\t40\n"
                                    "bench_default\t0\t5\t40\nbench_compile\t124\t100\t100\n")

    summary = gpu_check.summarize(out, work, dry_run=False)
    assert summary == json.loads((out / "summary.json").read_text())
    assert set(json.loads((out / "bench.json").read_text())) == {"reference", "default"}
    tests = summary["tests"]
    assert (tests["passed"], tests["failed"], tests["skipped"], tests["errors"]) == (1, 1, 1, 0)
    assert tests["not_passed"][0]["test"].endswith("test_bad") and "one is not two" in tests["not_passed"][0]["message"]
    assert tests["skip_reasons"] == {"no GPU": 1}
    assert summary["parts"]["bench_compile"]["timed_out"] and not summary["ok"]
    assert list(summary["bench"]) == ["reference", "default"]  # in the order they ran
    t = summary["targets"]
    assert t["default"]["speedup_vs_reference"] == pytest.approx(2.0) and t["default"]["speedup_met"] is True
    assert t["default"]["mfu"] is None and t["default"]["mfu_met"] is None  # no MFU on a CPU
    assert t["compile"] is None
