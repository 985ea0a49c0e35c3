"""The layers DESIGN.md describes hold: each package imports only the ones below it."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("svd_common", "pose", "svd_controlnext", "svd_animate")
ALLOWED = {
    "svd_common": set(),
    "pose": {"svd_common"},
    "svd_controlnext": {"svd_common"},
    "svd_animate": {"svd_common", "pose", "svd_controlnext"},
}
EXCEPTIONS = {"svd_controlnext/__main__.py"}  # `accelerate launch -m svd_controlnext` reaches the command


def our_imports(path: Path) -> set[str]:
    """The packages of ours a module imports, anywhere in it (deferred imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[0] for name in names if name.split(".")[0] in OURS}
    return found


@pytest.mark.parametrize("package", OURS)
def test_each_package_imports_only_the_layers_below(package):
    modules = sorted((ROOT / package).rglob("*.py"))
    assert modules
    crossing = {str(path.relative_to(ROOT)): sorted(our_imports(path) - ALLOWED[package] - {package})
                for path in modules if str(path.relative_to(ROOT)) not in EXCEPTIONS}
    assert {path: names for path, names in crossing.items() if names} == {}


def test_the_documented_names_stay_importable_where_the_readme_says():
    from pose import InputError, PoseSequence  # noqa: F401
    from pose.detect import load_detector  # noqa: F401
    from pose.extract import detect_reference  # noqa: F401
    from svd_controlnext.cross_norm import cross_normalize  # noqa: F401
    from svd_controlnext.decode import iter_decoded_frames  # noqa: F401
    from svd_controlnext.encoder import PoseEncoder  # noqa: F401
    from svd_controlnext.injection import inject_control  # noqa: F401
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline  # noqa: F401
    from svd_controlnext.weights import load_pose_encoder, load_unet  # noqa: F401
