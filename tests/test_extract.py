import multiprocessing

import numpy as np
import pytest

from pose.cache import PoseCache, cache_key
from pose.detect.base import PoseDetector
from pose.extract import ExtractSettings, extract_video, fill_gaps
from pose.skeleton import PoseSequence
from svd_common.errors import NoPersonError
from tests.helpers import make_pose, square_frames, write_clip


class SquareDetector(PoseDetector):
    """Finds the white square of `square_frames`: its top-left corner is the nose."""

    name = "square"

    def __init__(self):
        self.calls = 0

    def settings(self):
        return {"threshold": 128}

    def detect(self, image):
        self.calls += 1
        ys, xs = np.nonzero(image[..., 0] > 128)
        if not len(xs):
            return None
        h, w = image.shape[:2]
        return make_pose({0: (xs.min() / w, ys.min() / h)}, body_score=0.9)


def test_fill_gaps_interpolates_hand_computed():
    a = make_pose({0: (0.1, 0.2)}, body_score=0.9)
    b = make_pose({0: (0.5, 0.6)}, body_score=0.5)
    frames, filled = fill_gaps([None, a, None, None, b, None])
    assert filled.tolist() == [True, False, True, True, False, True]
    np.testing.assert_allclose(frames[0]["body"][0], [0.1, 0.2])  # held before the first detection
    np.testing.assert_allclose(frames[2]["body"][0], [0.1 + 0.4 / 3, 0.2 + 0.4 / 3], atol=1e-6)
    np.testing.assert_allclose(frames[3]["body"][0], [0.1 + 0.8 / 3, 0.2 + 0.8 / 3], atol=1e-6)
    assert frames[2]["body_score"][0] == pytest.approx(0.5)  # the smaller score
    np.testing.assert_allclose(frames[5]["body"][0], [0.5, 0.6])  # held after the last
    assert np.isnan(frames[2]["body"][1]).all()  # missing stays missing


def test_fill_gaps_hold_and_no_person():
    a = make_pose({0: (0.1, 0.2)})
    b = make_pose({0: (0.5, 0.6)})
    frames, _ = fill_gaps([a, None, b], mode="hold")
    np.testing.assert_allclose(frames[1]["body"][0], [0.1, 0.2])
    with pytest.raises(NoPersonError, match="no person"):
        fill_gaps([None, None])


def test_extract_follows_frames_and_reports_gaps(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", square_frames(12, missing={4, 5}), fps=10)
    result = extract_video(clip, SquareDetector(), ExtractSettings(stride=2), progress=False)
    poses = result.poses
    assert poses.frame_index.tolist() == [0, 2, 4, 6, 8, 10]
    assert poses.filled.tolist() == [False, False, True, False, False, False]
    assert (poses.width, poses.height, poses.fps) == (64, 48, 5.0)
    x = poses.body[:, 0, 0] * 64
    np.testing.assert_allclose(x[[0, 1, 3]], [4, 8, 16], atol=1)  # the square moves 2 px per frame
    assert x[2] == pytest.approx((x[1] + x[3]) / 2, abs=1e-4)  # interpolated
    assert not result.from_cache


def test_no_person_in_any_frame(tmp_path):
    clip = write_clip(tmp_path / "black.mp4", square_frames(6, missing=set(range(6))), fps=10)
    with pytest.raises(NoPersonError, match="black.mp4: no person was found in any of its 6 frames"):
        extract_video(clip, SquareDetector(), progress=False)


def test_second_run_extracts_nothing(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", square_frames(8), fps=10)
    cache = PoseCache(tmp_path / "cache")
    detector = SquareDetector()
    first = extract_video(clip, detector, cache=cache, progress=False)
    assert detector.calls == 8 and not first.from_cache and first.cache_path.is_file()
    # The same content under another name still hits: the key is the content hash.
    copy = tmp_path / "renamed.mp4"
    copy.write_bytes(clip.read_bytes())
    second = extract_video(copy, detector, cache=cache, progress=False)
    assert detector.calls == 8 and second.from_cache
    np.testing.assert_array_equal(second.poses.body, first.poses.body)
    # Other settings are another entry.
    extract_video(clip, detector, ExtractSettings(stride=2), cache=cache, progress=False)
    assert detector.calls == 12


def test_damaged_cache_entry_is_a_miss(tmp_path):
    clip = write_clip(tmp_path / "clip.mp4", square_frames(4), fps=10)
    cache = PoseCache(tmp_path / "cache")
    detector = SquareDetector()
    path = extract_video(clip, detector, cache=cache, progress=False).cache_path
    path.write_bytes(b"damaged")
    again = extract_video(clip, detector, cache=cache, progress=False)
    assert not again.from_cache and detector.calls == 8
    assert PoseSequence.load(path).num_frames == 4  # rewritten whole


def test_cache_key_depends_on_everything():
    base = cache_key("abc", "dwpose", {"a": 1}, {"stride": 1})
    assert base == cache_key("abc", "dwpose", {"a": 1}, {"stride": 1})
    assert len({base, cache_key("abd", "dwpose", {"a": 1}, {"stride": 1}),
                cache_key("abc", "mediapipe", {"a": 1}, {"stride": 1}),
                cache_key("abc", "dwpose", {"a": 2}, {"stride": 1}),
                cache_key("abc", "dwpose", {"a": 1}, {"stride": 2})}) == 5


def _writer(directory, key, seed, rounds):
    cache = PoseCache(directory)
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        seq = PoseSequence.empty(200, 64, 48, 10)
        seq.body[:] = rng.random(seq.body.shape)
        seq.body_score[:] = 1.0
        cache.put(key, seq)


def _reader(directory, key, wanted, errors):
    import time

    cache = PoseCache(directory)
    seen = 0
    deadline = time.monotonic() + 60
    while seen < wanted and time.monotonic() < deadline:
        path = cache.path(key)
        if path.exists():
            PoseSequence.load(path)  # raises on a torn file
            seen += 1
    errors.put(seen)


def test_concurrent_writers_never_corrupt(tmp_path):
    context = multiprocessing.get_context("spawn")
    errors = context.Queue()
    processes = [context.Process(target=_writer, args=(tmp_path, "k" * 64, seed, 60)) for seed in range(2)]
    processes.append(context.Process(target=_reader, args=(tmp_path, "k" * 64, 50, errors)))
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
    assert [p.exitcode for p in processes] == [0, 0, 0]
    assert errors.get(timeout=5) == 50  # every read saw a whole file
    entry = PoseCache(tmp_path).path("k" * 64)
    assert PoseSequence.load(entry).num_frames == 200
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary files left


def test_partly_out_of_frame_compares_with_the_clips_usual_count():
    from pose.extract import partly_out_of_frame

    whole = make_pose({j: (0.5, 0.05 * j) for j in range(18)})  # 18 body points visible
    leaving = make_pose({j: (0.95, 0.05 * j) for j in range(4)})  # 4 of them: under half the median (18)
    seq = PoseSequence.stack([whole, whole, leaving, whole, whole], 64, 64, fps=5,
                             filled=np.array([False, False, False, False, True]))
    seq.body_score[4] = 0  # a filled frame is reported apart, not as leaving
    assert partly_out_of_frame(seq).tolist() == [False, False, True, False, False]
    sparse = PoseSequence.stack([make_pose({0: (0.1, 0.1)})] * 3, 64, 64, fps=5)  # a detector with one point
    assert not partly_out_of_frame(sparse).any()


class CrowdDetector(SquareDetector):
    """The square, with a second person counted in the frames given."""

    def __init__(self, crowded_calls=()):
        super().__init__()
        self.crowded_calls = set(crowded_calls)

    def detect(self, image):
        pose = super().detect(image)
        self.people_seen = 2 if self.calls in self.crowded_calls else 1
        return pose


def test_a_second_person_is_named_in_the_video_and_in_the_reference(tmp_path, caplog):
    from pose.extract import detect_reference

    clip = write_clip(tmp_path / "clip.mp4", square_frames(6), fps=10)
    cache = PoseCache(tmp_path / "cache")
    with caplog.at_level("WARNING", logger="pose.extract"):
        extract_video(clip, CrowdDetector({2, 3}), ExtractSettings(), cache, progress=False)
        extract_video(clip, CrowdDetector(), ExtractSettings(), cache, progress=False)  # a cache hit says it again
    message = f"{clip}: another person is in 2 of 6 frames; the dancer who is largest at the start is followed"
    assert [r.getMessage() for r in caplog.records] == [message, message]
    caplog.clear()
    frame = square_frames(1)[0]
    with caplog.at_level("WARNING", logger="pose.extract"):
        detect_reference("ref.png", CrowdDetector({1}), frame)
        detect_reference("ref.png", CrowdDetector(), frame)
    assert [r.getMessage() for r in caplog.records] == [
        "ref.png: 2 people in the reference image; the largest is taken as the character (crop the image to choose "
        "another)"]
