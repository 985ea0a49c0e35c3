import json
import os

import numpy as np
import pytest

from pose.skeleton import PoseSequence
from svd_common.errors import InputError


def random_sequence(t=5, seed=0):
    rng = np.random.default_rng(seed)
    seq = PoseSequence(
        body=rng.random((t, 18, 2)), body_score=rng.random((t, 18)),
        hands=rng.random((t, 2, 21, 2)), hands_score=rng.random((t, 2, 21)),
        face=rng.random((t, 68, 2)), face_score=rng.random((t, 68)),
        width=576, height=1024, fps=14.5, frame_index=np.arange(0, 2 * t, 2),
        filled=np.arange(t) == 2, meta={"detector": "test"},
    )
    seq.hands[1, 0] = np.nan  # a missing hand
    seq.hands_score[1, 0] = 0
    return seq


def test_roundtrip_keeps_everything(tmp_path):
    seq = random_sequence()
    path = seq.save(tmp_path / "poses.npz")
    loaded = PoseSequence.load(path)
    for name, array in seq.arrays().items():
        np.testing.assert_array_equal(getattr(loaded, name), array)
    np.testing.assert_array_equal(loaded.frame_index, [0, 2, 4, 6, 8])
    assert loaded.filled.tolist() == [False, False, True, False, False]
    assert (loaded.width, loaded.height, loaded.fps, loaded.meta) == (576, 1024, 14.5, {"detector": "test"})
    assert loaded.num_filled == 1
    assert [p.name for p in tmp_path.iterdir()] == ["poses.npz"]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's owner-only mode


def test_empty_marks_every_point_missing():
    seq = PoseSequence.empty(3, 64, 48, 10)
    assert seq.body.shape == (3, 18, 2) and np.isnan(seq.body).all()
    assert seq.hands.shape == (3, 2, 21, 2) and seq.face.shape == (3, 68, 2)
    assert (seq.body_score == 0).all() and (seq.face_score == 0).all()


def test_select_slices_every_array():
    seq = random_sequence()
    part = seq.select(slice(1, 3))
    assert len(part) == 2
    np.testing.assert_array_equal(part.face, seq.face[1:3])
    np.testing.assert_array_equal(part.frame_index, [2, 4])


def test_shape_mismatch_is_rejected():
    seq = random_sequence()
    with pytest.raises(ValueError, match="hands has shape"):
        seq.replace(hands=seq.hands[:, :1])


@pytest.mark.parametrize("content, message", [
    (b"this is not a zip file", "not a readable pose file"),
    (b"", "not a readable pose file"),
])
def test_garbage_file_gets_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as info:
        PoseSequence.load(path)
    assert str(path) in str(info.value)


def test_truncated_file_gets_clear_error(tmp_path):
    path = random_sequence().save(tmp_path / "poses.npz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable pose file|corrupt"):
        PoseSequence.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such pose file"):
        PoseSequence.load(tmp_path / "nope.npz")


def _rewrite(path, **changes):
    with np.load(path) as data:
        contents = {k: data[k] for k in data.files}
    contents.update(changes)
    contents = {k: v for k, v in contents.items() if v is not None}
    np.savez(path, **contents)


def test_other_version_is_refused(tmp_path):
    path = random_sequence().save(tmp_path / "poses.npz")
    header = json.loads(str(np.load(path)["header"]))
    header["version"] = 99
    _rewrite(path, header=np.array(json.dumps(header)))
    with pytest.raises(InputError, match="version 99 is not supported"):
        PoseSequence.load(path)


def test_plain_npz_without_header_is_refused(tmp_path):
    path = tmp_path / "other.npz"
    np.savez(path, body=np.zeros((1, 18, 2)))
    with pytest.raises(InputError, match="not an svd-animate pose file"):
        PoseSequence.load(path)


def test_missing_array_and_bad_shape_are_named(tmp_path):
    path = random_sequence().save(tmp_path / "poses.npz")
    _rewrite(path, face=None)
    with pytest.raises(InputError, match="missing face"):
        PoseSequence.load(path)
    path = random_sequence().save(tmp_path / "poses2.npz")
    _rewrite(path, body_score=np.zeros((5, 17), np.float32))
    with pytest.raises(InputError, match="body_score has shape"):
        PoseSequence.load(path)
    path = random_sequence().save(tmp_path / "poses3.npz")
    _rewrite(path, face_score=-np.ones((5, 68), np.float32))
    with pytest.raises(InputError, match="negative or non-finite"):
        PoseSequence.load(path)


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "pickle.npz"
    np.savez(path, header=np.array([{"format": "svd-animate.pose"}], dtype=object))
    with pytest.raises(InputError):
        PoseSequence.load(path)
