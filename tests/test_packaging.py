"""The wheel a user installs works away from the checkout: presets inside it, the command importable
without a top-level `cli` module."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel built from this checkout and unpacked into a folder of its own (`pip install --target`)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy, so the build leaves nothing (build/, *.egg-info) in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "tests", "bench", "build", "*.egg-info",
                                                                "__pycache__", "demo"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
                   check=True, cwd=work, capture_output=True)
    wheel = next((work / "dist").glob("svd_animate-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(work / "site"), str(wheel)],
                   check=True, cwd=work, capture_output=True)
    return wheel, work / "site"


def run_installed(site: Path, code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_the_wheel_ships_every_preset_and_no_cli_module(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    presets = {f"svd_animate/configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")}
    assert presets and presets <= names
    assert "cli.py" not in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "svd-animate = svd_animate.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_the_installed_package_loads_its_presets_away_from_the_checkout(installed, tmp_path):
    _, site = installed
    result = run_installed(site, (
        "import svd_animate.config as c, svd_animate.train.config as t\n"
        "print(c.__file__)\n"
        "print(c.load_preset('tiny').width, c.load_preset('controlnext-svd-v2').width)\n"
        "print(t.load_train_config('tiny').base_model)\n"
        "import importlib.util; print(importlib.util.find_spec('cli'))\n"), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert Path(lines[0]).is_relative_to(site)
    assert lines[1] == "64 576"
    assert lines[2] == "tiny"
    assert lines[3] == "None"  # nothing called `cli` is installed


def test_python_m_svd_animate_runs_the_command_from_the_wheel(installed, tmp_path):
    _, site = installed
    result = subprocess.run([sys.executable, "-m", "svd_animate", "--preset", "nonexistent", "--ref", "x", "--pose",
                             "y"], capture_output=True, text=True, cwd=tmp_path,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.startswith("svd-animate: error: ") and "tiny" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_wheel_ships_the_comfyui_nodes_and_workflows_not_the_repositorys_init(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    workflows = {f"svd_animate/comfy/example_workflows/{p.name}" for p in (ROOT / "example_workflows").glob("*.json")}
    assert len(workflows) == 3 and workflows <= names
    assert {"svd_animate/comfy/nodes.py", "svd_animate/comfy/install.py"} <= names
    assert "__init__.py" not in names  # ComfyUI's entry to a clone stays in the repository


def test_the_dependencies_are_requirements_txt_the_one_list(installed):
    wheel, _ = installed
    archive = zipfile.ZipFile(wheel)
    metadata = archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))).decode()
    required = {str(Requirement(line.split(":", 1)[1])) for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line}
    listed = {str(Requirement(line)) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    assert required == listed and "torch>=2.2" in listed


def test_the_installed_package_adds_its_nodes_to_a_comfyui_folder(installed, tmp_path):
    _, site = installed
    (tmp_path / "ComfyUI" / "custom_nodes").mkdir(parents=True)
    command = [sys.executable, "-m", "svd_animate", "comfyui", str(tmp_path / "ComfyUI")]
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for _ in range(2):  # the second run replaces the folder the first wrote
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
        assert result.returncode == 0, result.stderr
    folder = tmp_path / "ComfyUI" / "custom_nodes" / "svd-animate"
    assert sorted(p.name for p in (folder / "example_workflows").iterdir()) == ["animate.json", "fast.json",
                                                                               "poses.json"]
    assert "from svd_animate.comfy.nodes import NODE_CLASS_MAPPINGS" in (folder / "__init__.py").read_text()
    assert [p.name for p in folder.parent.iterdir()] == ["svd-animate"]  # no work folder left
    (folder / "__init__.py").write_text("# someone else's pack\n")
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 2 and "not written by `svd-animate comfyui`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (folder / "__init__.py").read_text() == "# someone else's pack\n"
