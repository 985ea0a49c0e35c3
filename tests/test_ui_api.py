"""The page's API for scripts (gradio_client: `/poses` and `/animate`, arguments named after the options), and a
page safe to serve beyond this machine: a login, a cap on uploads, uploads removed once used."""

import contextlib
import re
import socket
import subprocess
import sys

import av
import httpx
import pytest

gr = pytest.importorskip("gradio")

from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

from pose.skeleton import PoseSequence  # noqa: E402
from svd_animate import cli  # noqa: E402
from svd_animate.ui.access import is_loopback, read_logins  # noqa: E402
from svd_animate.ui.jobs import JobRunner  # noqa: E402
from svd_animate.ui.page import Page, page_options  # noqa: E402
from svd_common.errors import InputError  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CLIP = "driving_controlnext_v2_01.mp4"
REF = "ref_controlnext_v2_01.jpeg"
LOGIN = ("ada", "lovelace")
CAP = 2_000_000  # bytes: the clip (1.6 MB) and the reference fit
EXAMPLE = ROOT / "examples" / "page_api.py"


class RecordingRunner(JobRunner):
    """The real runner, noting the values each job was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.given = []

    def poses(self, reference, video, values, *args, **kwargs):
        self.given.append(values)
        return super().poses(reference, video, values, *args, **kwargs)

    def animate(self, reference, video, values, *args, **kwargs):
        self.given.append(values)
        return super().animate(reference, video, values, *args, **kwargs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("ui-api")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(base / "uploads"))  # read when the page is built and served
        runner = RecordingRunner(base / "out", device="cpu", cache_dir=base / "pose-cache",
                                 fixed={"detector": "mediapipe"})
        page = Page(runner, preset="tiny")
        port = free_port()
        blocks = page.serve("127.0.0.1", port, auth=[LOGIN], max_upload_bytes=CAP)
        page.url, page.uploads = f"http://127.0.0.1:{port}/", base / "uploads"
        yield page
        blocks.close()
        runner.close()


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.url, auth=LOGIN, download_files=str(tmp_path_factory.mktemp("downloads")), verbose=False)


def uploaded(server) -> list[str]:
    return sorted(path.name for path in server.uploads.rglob("*") if path.is_file())


def count_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_the_api_is_the_two_jobs_with_the_options_as_named_arguments(client):
    api = client.view_api(return_format="dict", print_info=False)
    assert set(api["named_endpoints"]) == {"/poses", "/animate"} and not api["unnamed_endpoints"]
    names = ["reference", "video", *(option.name for option in page_options())]
    for endpoint in api["named_endpoints"].values():
        parameters = {p["parameter_name"]: p for p in endpoint["parameters"]}
        assert list(parameters) == names
        assert {"steps", "seed", "fast", "max_frames", "align"} <= set(parameters)
        assert [parameters[f]["python_type"]["type"] for f in ("reference", "video")] == ["filepath"] * 2
        assert not parameters["reference"]["parameter_has_default"]
        assert all(p["parameter_has_default"] and p["parameter_default"] is None for p in endpoint["parameters"][2:])
        assert parameters["steps"]["python_type"]["type"] == "None | int"
        assert parameters["align"]["python_type"]["type"] == "None | Literal['ls', 'bones', 'none']"
        assert parameters["preset"]["python_type"]["type"] == "None | Literal['controlnext-svd-v2', 'fast', 'tiny']"
        assert [r["python_type"]["type"] for r in endpoint["returns"]] == ["filepath"] * 2


@pytest.mark.realdata
def test_a_script_runs_both_steps_by_name_and_the_uploads_go(server, client, shared_data):
    preview, poses = client.predict(handle_file(shared_data / REF), handle_file(shared_data / CLIP), align="none",
                                    max_frames=8, api_name="/poses")
    assert PoseSequence.load(poses).meta["align"]["method"] == "none" and count_frames(preview) == 8
    server.runner.given.clear()
    video, poses = client.predict(handle_file(shared_data / REF), handle_file(shared_data / CLIP), steps=2, seed=7,
                                  max_frames=6, side_by_side=True, api_name="/animate")
    (values,) = server.runner.given
    assert (values["steps"], values["seed"], values["max_frames"], values["side_by_side"]) == (2, 7, 6, True)
    assert values["preset"] == "tiny" and values["fast"] is None  # left out: the server's preset, its values
    assert server.runner.config(values).steps == 2
    assert count_frames(video) == 6 and len(PoseSequence.load(poses)) == 6
    with av.open(str(video)) as container:
        assert container.streams.video[0].width == 2 * 64  # skeleton | result
    name = f"{CLIP[:-4]}_{REF[:-5]}.mp4"
    (folder,) = [folder for folder in server.runner.output_dir.iterdir() if (folder / name).is_file()]
    assert sorted(p.name for p in folder.iterdir()) == [name, "poses.npz"]  # the job's folder on the server
    assert not {REF, CLIP} & set(uploaded(server))  # Gradio's copies of the uploads are gone
    assert (shared_data / CLIP).is_file()


def test_a_bad_argument_is_one_line_and_the_calls_uploads_go(server, client, tmp_path):
    reference, video = tmp_path / "me.png", tmp_path / "dance.mp4"
    reference.write_bytes(b"not an image")
    video.write_bytes(b"not a video")
    cases = [({"steps": 0}, "--steps must be at least 1, got 0"),
             ({"steps": 2.5}, "steps: must be a whole number, got 2.5"),
             ({"fast": "yes"}, "fast: must be true or false, got 'yes'"),
             ({"preset": "/etc/my.yaml"}, "preset '/etc/my.yaml': choose one of controlnext-svd-v2, fast, tiny"),
             ({}, "dance.mp4: not a readable video")]
    for arguments, message in cases:
        with pytest.raises(AppError) as error:
            client.predict(handle_file(reference), handle_file(video), **arguments, api_name="/poses")
        assert message in str(error.value) and "\n" not in str(error.value)
        assert not {"me.png", "dance.mp4"} & set(uploaded(server))


def test_a_visitor_without_the_password_gets_nothing(server, client, tmp_path):
    for path in ("config", "gradio_api/info", f"gradio_api/file={server.runner.output_dir}"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401 and response.json()["detail"]["error"] == "Not authenticated"
    assert httpx.post(server.url + "gradio_api/upload", files={"files": ("a.mp4", b"x")}).status_code == 401
    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(server.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(server.url, auth=("ada", "babbage"), verbose=False)


@contextlib.contextmanager
def logged_in(server):
    """An HTTP session past the login form, as a browser's."""
    with httpx.Client(base_url=server.url) as session:
        assert session.post("login", data=dict(zip(("username", "password"), LOGIN))).json() == {"success": True}
        yield session


def test_an_upload_over_the_cap_is_refused(server, client, tmp_path):
    with logged_in(server) as session:
        refused = session.post("gradio_api/upload", files={"files": ("big.mp4", b"x" * (CAP + 1))})
        assert refused.status_code == 413
        assert refused.text == f"File size exceeded maximum allowed size of {CAP} bytes."
        accepted = session.post("gradio_api/upload", files={"files": ("fits.mp4", b"x" * CAP)})
        assert accepted.status_code == 200
    assert "big.mp4" not in uploaded(server) and "fits.mp4" in uploaded(server)
    big = tmp_path / "big.mp4"
    big.write_bytes(b"x" * (CAP + 1))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {CAP} bytes"):  # the client checks first
        client.predict(handle_file(big), handle_file(big), api_name="/poses")


def test_a_visitors_uploads_go_when_they_leave_the_page(server, tmp_path):
    from types import SimpleNamespace

    with logged_in(server) as session:
        (upload,) = session.post("gradio_api/upload", files={"files": ("mine.jpeg", b"jpeg")}).json()
    own = tmp_path / "dance.mp4"  # not an upload: a path the server was given is never removed
    own.write_bytes(b"clip")
    visitors = [SimpleNamespace(session_hash=name) for name in ("a", "b")]
    for visitor in visitors:  # both used the same upload (same bytes, same name: one file in Gradio's folder)
        _, job_id = server.arm(("tiny", False, False), visitor)
        data = {server.job_box: job_id, server.choice_state: ("tiny", False, False), server.reference_input: upload,
                server.video_input: str(own), **{c: c.value for c in server.option_inputs}}  # as shown
        assert server._job(lambda *args: "done", data, lambda *a, **k: None) == ("done", None)
    server.forget(visitors[0])
    assert "mine.jpeg" in uploaded(server)  # still the other visitor's
    server.forget(visitors[1])
    assert "mine.jpeg" not in uploaded(server) and own.is_file()


@pytest.mark.realdata
def test_the_readme_example_runs(server, shared_data, tmp_path):
    code = EXAMPLE.read_text()
    assert f"```python\n{code}```" in (ROOT / "README.md").read_text()
    env = {"GRADIO_TEMP_DIR": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, str(EXAMPLE), server.url, ":".join(LOGIN), str(shared_data / REF),
                          str(shared_data / CLIP)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    poses = re.search(r"^poses: (.+)$", run.stdout, re.M).group(1)
    video = re.search(r"^animation: (.+)$", run.stdout, re.M).group(1)
    assert len(PoseSequence.load(poses)) == 8 and count_frames(video) == 8


# -- serving beyond this machine ---------------------------------------------------------------------------

def test_loopback_hosts():
    assert all(map(is_loopback, ("127.0.0.1", "127.4.5.6", "::1", "localhost", "LOCALHOST")))
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.20", "my-box.local", "")))


def test_logins_from_flags_and_a_file(tmp_path):
    logins = tmp_path / "logins"
    logins.write_text("# the team\nada:lovelace\n\n  grace:a:b:c  \n")
    assert read_logins(["alan:turing"], logins) == [("alan", "turing"), ("ada", "lovelace"), ("grace", "a:b:c")]
    logins.write_text("ada:lovelace\ngrace-without-password\n")
    with pytest.raises(InputError, match=rf"^--auth-file {logins}: line 2: expected user:password \(a user name"):
        read_logins([], logins)
    with pytest.raises(InputError, match=r"^--auth: expected user:password") as error:
        read_logins(["secret-only"])
    assert "secret-only" not in str(error.value)  # a password is never echoed
    with pytest.raises(InputError, match=rf"^--auth-file {tmp_path / 'none'}: No such file or directory$"):
        read_logins([], tmp_path / "none")


def test_a_network_host_without_a_login_is_refused_in_one_line(tmp_path, capsys):
    site = tmp_path / "site"
    assert cli.main(["ui", "--host", "0.0.0.0", "--output-dir", str(site)]) == 2
    assert capsys.readouterr().err == (
        "svd-animate: error: --host 0.0.0.0 lets anyone on the network use this GPU and disk: pass --auth "
        "user:password or --auth-file FILE (or --no-auth to serve it without a login)\n")
    assert cli.main(["ui", "--host", "0.0.0.0", "--no-auth", "--auth", "ada:x", "--output-dir", str(site)]) == 2
    assert capsys.readouterr().err == "svd-animate: error: --no-auth and --auth/--auth-file: choose one\n"
    assert not site.exists()  # refused before anything was made
