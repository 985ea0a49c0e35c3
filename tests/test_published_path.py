"""The path around the sampler under `--published-sampling`, step by step, against hand-computed values
from the published code (ControlNeXt-SVD-v2 `utils/pre_process.py`, `dwpose/preprocess.py`,
`run_controlnext.py`), and ours where it differs on purpose."""

import dataclasses

import numpy as np
import pytest
import torch

from pose.detect.base import PoseDetector
from pose.skeleton import PoseSequence
from svd_animate.animate import AnimateConfig, driving_frames_cap, driving_poses, load_reference, output_fps
from svd_animate.config import load_preset, with_published_sampling
from svd_animate.framing import crop_reference, crop_reference_published, published_cover_size
from svd_common.errors import InputError, WeightsError
from svd_controlnext.windows import fusion_weights, plan_windows
from tests.helpers import make_pose, square_frames, write_clip


def test_published_cover_size_and_crop_offsets_hand_computed():
    # 1200x2140 onto 576x1024: h/w = 1.7833 >= 1024/576, so width 576 and height ceil(576 * 1.7833) = 1028
    # (ours rounds the scale 0.48 to 1027 rows); center_crop's top is int(round(4 / 2)) = 2.
    assert published_cover_size(1200, 2140, 576, 1024) == (1028, 576)
    # 2000x1000 onto 576x1024: h/w = 0.5 < 1.78, so height 1024 and width ceil(1024 / 0.5) = 2048.
    assert published_cover_size(2000, 1000, 576, 1024) == (1024, 2048)


def test_published_crop_is_bilinear_without_antialiasing():
    """4x8 (w x h) onto 2x2: resized to 2x4 by exact halving, so bilinear with align_corners=False takes
    the mean of each 2x2 block (no wider low-pass), rounded half to even; the crop starts at row
    int(round((4 - 2) / 2)) = 1."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (8, 4, 3), dtype=np.uint8)
    blocks = image.astype(np.float64).reshape(4, 2, 2, 2, 3).mean(axis=(1, 3))  # (4, 2, 3)
    expected = np.round(blocks[1:3]).astype(np.uint8)
    np.testing.assert_array_equal(crop_reference_published(image, 2, 2), expected)
    assert not np.array_equal(crop_reference(image, 2, 2), expected)  # ours low-passes (bicubic, antialiased)


def test_published_crop_rounds_the_offset_half_to_even():
    # 2x7 onto 2x2: no resize (h/w = 3.5 -> ceil(2 * 3.5) = 7 rows, 2 columns); top = round(2.5) = 2.
    image = np.arange(7 * 2 * 3, dtype=np.uint8).reshape(7, 2, 3)
    np.testing.assert_array_equal(crop_reference_published(image, 2, 2), image[2:4])


class RecordingDetector(PoseDetector):
    """Returns the pose listed for each call and records the size of every image it sees."""
    name = "recording"

    def __init__(self, poses):
        self.poses, self.seen = list(poses), []

    def settings(self):
        return {"poses": len(self.poses)}

    def detect(self, image):
        self.seen.append(image.shape[:2])
        return self.poses.pop(0)


REFERENCE_POSE = make_pose({0: (0.5, 0.2), 1: (0.5, 0.3), 8: (0.45, 0.6), 11: (0.55, 0.6), 10: (0.45, 0.9),
                            13: (0.55, 0.9)})


def test_reference_pose_is_detected_on_the_framed_image_when_published(tmp_path):
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.fromarray(np.full((100, 60, 3), 200, np.uint8)).save(path)
    config = AnimateConfig(width=64, height=128)
    ours = RecordingDetector([REFERENCE_POSE])
    reference = load_reference(path, config, lambda: ours)
    assert ours.seen == [(100, 60)] and reference.image.shape == (128, 64, 3)
    assert (reference.pose.width, reference.pose.height) == (60, 100)
    published = RecordingDetector([REFERENCE_POSE])
    reference = load_reference(path, config.replace(published_sampling=True), lambda: published)
    assert published.seen == [(128, 64)] and (reference.pose.width, reference.pose.height) == (64, 128)


def test_alignment_fit_uses_the_whole_video_and_every_keypoint_when_published(tmp_path):
    """Six strided frames; only the first two are kept (max 3 output frames, the reference pose first).
    The published fit runs over all six frames and all keypoints, low scores included; ours over the two
    kept frames and the confident ones."""
    video = write_clip(tmp_path / "clip.mp4", square_frames(12, 48, 64), fps=10)
    driving = []
    for t in range(6):
        pose = make_pose({0: (0.5, 0.1 + 0.02 * t), 1: (0.5, 0.2 + 0.01 * t), 8: (0.45, 0.5), 11: (0.55, 0.5),
                          10: (0.45, 0.7 + 0.03 * t), 13: (0.55, 0.8)})
        pose["body_score"][13] = 0.1  # a keypoint the detector is unsure of
        driving.append(pose)
    ref_pose = PoseSequence.stack([REFERENCE_POSE], 64, 128, fps=1)
    joints = [0, 1, 8, 10, 11, 13]

    def expected_fit(frames, confident_only):
        drv = np.array([[driving[t]["body"][j] for j in joints] for t in frames], np.float64)
        keep = np.ones(drv.shape[:2], bool)
        if confident_only:
            keep[:, joints.index(13)] = False
        ref = np.broadcast_to(np.array([REFERENCE_POSE["body"][j] for j in joints], np.float64), drv.shape)
        a_y, b_y = np.polyfit(drv[..., 1][keep], ref[..., 1][keep], 1)
        a_x = a_y * (64 / 48) * (128 / 64)
        return [a_x, a_y], [np.mean(ref[..., 0][keep] - a_x * drv[..., 0][keep]), b_y]

    from svd_animate.animate import Reference

    for published, frames in ((True, range(6)), (False, range(2))):
        config = AnimateConfig(width=64, height=128, stride=2, max_frames=3, prepend_reference_pose=True,
                               published_sampling=published)
        detector = RecordingDetector(driving[:len(frames)] if not published else driving)
        poses = driving_poses(video, Reference(np.zeros((128, 64, 3), np.uint8), ref_pose, (64, 128)), config,
                              lambda: detector, None, progress=False)
        assert len(poses) == 2 and len(detector.seen) == len(frames)
        a, b = expected_fit(frames, confident_only=not published)
        np.testing.assert_allclose(poses.meta["align"]["a"], a, rtol=1e-9)
        np.testing.assert_allclose(poses.meta["align"]["b"], b, rtol=1e-9, atol=1e-12)


def test_max_frames_counts_the_reference_pose_and_fps_is_floored():
    config = with_published_sampling(load_preset("controlnext-svd-v2"))
    assert driving_frames_cap(config) == 239 and driving_frames_cap(dataclasses.replace(config, max_frames=None)) is None
    assert driving_frames_cap(AnimateConfig(max_frames=10)) == 10
    with pytest.raises(InputError, match="at least 2"):
        driving_frames_cap(config.replace(max_frames=1))
    poses = PoseSequence.empty(3, 64, 64, fps=29.97 / 2).replace(meta={"source_fps": 29.97, "stride": 2})
    assert output_fps(poses, config) == 14.0
    assert output_fps(poses, AnimateConfig()) == pytest.approx(14.985)


def test_explicit_choices_survive_published_sampling():
    config = with_published_sampling(AnimateConfig(), explicit=["dtype", "decode_chunk_size"])
    assert (config.dtype, config.decode_chunk_size, config.fusion) == ("auto", None, "uniform")


def test_published_sampling_from_cli_flags():
    from svd_animate import cli

    parser = cli.build_parser()
    args = parser.parse_args(["animate", "--ref", "r.png", "--pose", "p.mp4", "--published-sampling"])
    config = cli.config_from_args(args)
    assert (config.dtype, config.decode_chunk_size, config.max_frames, config.published_sampling) == (
        "fp32", 2, 240, True)
    args = parser.parse_args(["animate", "--ref", "r.png", "--pose", "p.mp4", "--published-sampling", "--dtype",
                              "bf16", "--decode-chunk", "4", "--max-frames", "48"])
    config = cli.config_from_args(args)
    assert (config.dtype, config.decode_chunk_size, config.max_frames) == ("bf16", 4, 48)


def test_fusion_weights_sum_to_one_in_fp32_where_three_windows_overlap():
    """Windows of 3 overlapping by 2 over 5 frames: frame 2 gets 1/3 from each of three windows. In fp16,
    1/3 is 0.333251953125, so the three weights sum to 1 - 2.44140625e-4 (a 0.02 % shrink of that frame's
    latents at every step); the fp32 weights the pipeline now uses miss 1 by at most an fp32 step."""
    windows = plan_windows(5, 3, 2)
    assert windows == [(0, 3), (1, 4), (2, 5)]
    weights = fusion_weights(windows, 5, "uniform")
    for dtype, miss in ((torch.float16, 2.44140625e-4), (torch.float32, None)):
        total = np.zeros(5)
        for (start, end), w in zip(windows, weights):
            total[start:end] += torch.as_tensor(w, dtype=dtype).double().numpy()
        if miss is not None:
            assert 1 - total[2] == pytest.approx(miss, rel=1e-9)
        else:
            assert abs(1 - total).max() <= torch.finfo(torch.float32).eps


def test_preset_loads_base_plus_unet_bin_plus_control_weights(tmp_path, caplog):
    """`load_pipeline` assembles the published model from local files: the base folder's pretrained UNet
    with a published-format unet.bin over it (a tensor missing from the file keeps the base's value), the
    base's VAE and CLIP, and the control encoder."""
    from diffusers import StableVideoDiffusionPipeline

    from svd_animate.animate import load_pipeline
    from svd_controlnext.tiny import tiny_components

    base = tiny_components(0)
    encoder = base.pop("pose_encoder")
    StableVideoDiffusionPipeline(**base).save_pretrained(tmp_path / "base")
    encoder.save_pretrained(tmp_path / "control")
    fine_tuned = {key: value + 1 for key, value in base["unet"].state_dict().items()}
    missing = "conv_out.bias"
    del fine_tuned[missing]
    torch.save(fine_tuned, tmp_path / "unet.bin")
    config = AnimateConfig(base_model=str(tmp_path / "base"), control_weights=str(tmp_path / "control"),
                           unet_weights=str(tmp_path / "unet.bin"), dtype="fp32")
    pipe = load_pipeline(config, None, "cpu", torch.float32)
    state = pipe.unet.state_dict()
    assert torch.equal(state["conv_in.weight"], fine_tuned["conv_in.weight"])
    assert torch.equal(state[missing], base["unet"].state_dict()[missing])
    assert torch.equal(pipe.vae.state_dict()["decoder.conv_out.weight"], base["vae"].state_dict()["decoder.conv_out.weight"])
    assert all(torch.equal(a, b) for a, b in zip(pipe.pose_encoder.state_dict().values(), encoder.state_dict().values()))


def test_a_gated_base_model_is_one_line(tmp_path, monkeypatch):
    from svd_animate.animate import load_pipeline
    from svd_controlnext import weights
    from svd_controlnext.pipeline import ControlNeXtSVDPipeline
    from svd_controlnext.tiny import tiny_pose_encoder, tiny_unet
    from tests.test_weights_hub import hub_error

    tiny_pose_encoder().save_pretrained(tmp_path / "control")
    config = AnimateConfig(control_weights=str(tmp_path / "control"), unet_weights=None)

    def gated(*args, **kwargs):
        raise OSError("cannot load") from hub_error(401, "GatedRepo", f"https://huggingface.co/api/models/{config.base_model}")

    monkeypatch.setattr(weights, "load_unet", lambda *args, **kwargs: tiny_unet())
    monkeypatch.setattr(ControlNeXtSVDPipeline, "from_pretrained", gated)
    with pytest.raises(WeightsError) as info:
        load_pipeline(config, None, "cpu", torch.float32)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and "accept its licence" in message and "hf auth login" in message


def test_npz_poses_and_align_none_follow_the_published_framing():
    """Poses in the reference's original frame go through the framing the image went through: 1000x1500 onto
    576x1024 has h/w = 1.5 < 1.78, so 1024 rows and ceil(1024 / 1.5) = 683 columns; the published crop starts
    at column int(round(107 / 2)) = 54 (ours: scale 0.6827, 683 columns, (683 - 576) // 2 = 53)."""
    from svd_animate.framing import crop_poses

    seq = PoseSequence.stack([make_pose({0: (0.5, 0.5), 1: (0.0, 0.25)})], 1000, 1500, fps=10)
    published = crop_poses(seq, 576, 1024, published=True)
    np.testing.assert_allclose(published.body[0, 1] * (576, 1024), [-54, 256], atol=1e-3)
    np.testing.assert_allclose(published.body[0, 0] * (576, 1024), [683 / 2 - 54, 512], atol=1e-3)
    ours = crop_poses(seq, 576, 1024)
    np.testing.assert_allclose(ours.body[0, 1] * (576, 1024), [-53, 256], atol=1e-3)
    same = PoseSequence.stack([make_pose({0: (0.3, 0.7)})], 576, 1024, fps=10)
    assert crop_poses(same, 576, 1024, published=True) is same  # already in the output frame


def test_published_reference_ignores_exif_orientation(tmp_path):
    """A 40x20 (w x h) photo tagged "rotate 90": ours reads it upright (20x40), published as stored."""
    from PIL import Image

    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    Image.fromarray(np.full((20, 40, 3), 90, np.uint8)).save(path, exif=exif)
    from svd_common.video import read_image

    assert read_image(path).shape[:2] == (40, 20)
    assert read_image(path, orientation=False).shape[:2] == (20, 40)
