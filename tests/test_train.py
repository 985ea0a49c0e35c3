import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from svd_animate import cli
from svd_animate.train import trainer as trainer_module
from svd_animate.train.config import TrainConfig, load_train_config
from svd_animate.train.data import PoseVideoDataset, read_clips
from svd_animate.train.trainer import train, training_loss
from svd_common.errors import InputError, TrainingError, WeightsError
from svd_controlnext.injection import ControlInjector
from tests.helpers import make_training_dataset, square_frames, write_clip

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one state per process; each in-process training run here starts its own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_training_dataset(tmp_path_factory.mktemp("data"), clips=3, frames=8)


def tiny_config(dataset, run, **changes) -> TrainConfig:
    config = load_train_config("tiny").replace(data=str(dataset), output_dir=str(run), max_steps=4,
                                               checkpoint_every=2, validate_every=100)
    return config.replace(**changes)


def run_cli(capsys, *args):
    code = cli.main(["-q", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---- data ----------------------------------------------------------------------------------------

def test_samples_shapes_reference_frame_and_determinism(dataset):
    data = PoseVideoDataset(dataset, num_frames=4, interval=2, width=64, height=64, seed=3, hand_loss_weight=4.2)
    sample = data[1]
    assert sample["pixels"].shape == sample["poses"].shape == (4, 3, 64, 64)
    assert sample["reference"].shape == (3, 64, 64) and sample["hand_weights"].shape == (4, 64, 64)
    assert torch.equal(sample["reference"], sample["pixels"][0])  # frame 0 is the reference frame
    assert -1 <= sample["pixels"].min() and sample["pixels"].max() <= 1 and 0 <= sample["poses"].min()
    assert sample["poses"].max() > 0.5  # a skeleton is drawn
    assert sample["hand_weights"].max() == pytest.approx(4.2)  # the left hand's box
    frames = data.choose_frames(1)
    assert frames[1:] == [frames[1] + 2 * k for k in range(3)] and 0 <= frames[0] < 8
    assert torch.equal(data[1]["pixels"], sample["pixels"])  # same (seed, epoch, index): same sample
    data.epoch = 1
    assert [data.choose_frames(i) for i in range(3)] != [PoseVideoDataset(
        dataset, 4, 2, 64, 64, seed=3).choose_frames(i) for i in range(3)]


def test_a_sample_starts_anywhere_its_frames_fit(dataset):
    """8-frame clips, 4 frames 2 apart (span 7): starts 0 and 1 both drawn, none later. (Published: starts
    0 to 8 - 4 x 2 = 0 only.)"""
    data = PoseVideoDataset(dataset, num_frames=4, interval=2, width=64, height=64)
    starts = set()
    for data.epoch in range(30):
        starts.update(data.choose_frames(i)[1] - 2 for i in range(len(data)))
    assert starts == {0, 1}


def test_training_framing_at_the_centre_is_inference_framing():
    """Cut at the centre, the training crop is what inference frames: `crop_reference`'s pixels and
    `crop_poses`'s coordinates. A 150x100 frame trained at 64x64: scaled by 0.64 to 96x64, cut at x = 16."""
    from pose.skeleton import PoseSequence
    from svd_animate.framing import crop_poses, crop_reference
    from svd_animate.train.data import centre_framing, frame_image, frame_poses
    from tests.helpers import make_pose

    image = np.random.default_rng(0).integers(0, 256, (100, 150, 3), np.uint8)
    framing = centre_framing(150, 100, 64, 64)
    assert (framing.scale, framing.size, framing.left, framing.top) == (0.64, (96, 64), 16, 0)
    assert np.array_equal(frame_image(image, framing, 64, 64), crop_reference(image, 64, 64))
    hands = np.full((2, 21, 2), np.nan, np.float32)
    hands[0, :2] = [[0.3, 0.4], [0.7, 0.6]]
    poses = PoseSequence.stack([make_pose({0: (0.5, 0.1), 4: (0.1, 0.9), 7: (0.95, 0.5)}, hands=hands)] * 2,
                               150, 100, fps=10)
    ours, inference = frame_poses(poses, framing, 64, 64), crop_poses(poses, 64, 64)
    assert (ours.width, ours.height) == (inference.width, inference.height) == (64, 64)
    for part in ("body", "hands", "face"):
        assert np.array_equal(getattr(ours, part), getattr(inference, part), equal_nan=True), part
    # by hand: x -> (x * 96 - 16) / 64, y unchanged (the height is not cut)
    assert ours.body[0, [0, 4, 7]].flatten().tolist() == pytest.approx([0.5, 0.1, -0.1, 0.9, 1.175, 0.5], abs=1e-6)


def test_a_sample_is_inference_framing_of_its_source_frames(tmp_path):
    """A 128x128 clip trained at 64x64 has one possible cut, the centre: each frame of a sample is
    `crop_reference` of the decoded source frame, each skeleton the drawing of `crop_poses`' poses."""
    from pose.render import render_sequence
    from pose.skeleton import PoseSequence
    from svd_animate.framing import crop_poses, crop_reference
    from svd_common.video import iter_frames

    folder = make_training_dataset(tmp_path, clips=1, frames=6, size=128)
    data = PoseVideoDataset(folder, num_frames=3, interval=2, width=64, height=64)
    sample, frames = data[0], data.choose_frames(0)
    source = dict(iter_frames(folder / "clip0.mp4"))
    framed = np.stack([crop_reference(source[f], 64, 64) for f in frames])
    assert torch.equal(sample["pixels"], torch.from_numpy(framed).permute(0, 3, 1, 2).float() / 127.5 - 1)
    poses = crop_poses(PoseSequence.load(folder / "poses" / "clip0.npz").select(np.array(frames)), 64, 64)
    skeletons = np.stack(list(render_sequence(poses, 64, 64)))
    assert skeletons.max() > 0  # a skeleton is drawn
    assert torch.equal(sample["poses"], torch.from_numpy(skeletons).permute(0, 3, 1, 2).float() / 255.0)


def test_short_clips_skipped_and_counted(dataset, caplog):
    data = PoseVideoDataset(dataset, num_frames=4, interval=2, width=64, height=64)
    assert len(data) == 3 and data.too_short == 0
    with pytest.raises(InputError, match=r"no usable clip: 3 clips, 3 shorter than 15 frames \(8 frames 2 apart\)"):
        PoseVideoDataset(dataset, num_frames=8, interval=2, width=64, height=64)


def test_published_layout(tmp_path):
    frames = square_frames(10, 64, 64)
    write_clip(tmp_path / "v.mp4", frames)
    write_clip(tmp_path / "g.mp4", [255 - f for f in frames])
    (tmp_path / "meta_info.json").write_text(json.dumps([{"video_path": "v.mp4", "guide_path": "g.mp4"}]))
    clips = read_clips(tmp_path)
    assert [(c.video.name, c.guide.name, c.frames, c.meta) for c in clips] == [("v.mp4", "g.mp4", 10, None)]
    sample = PoseVideoDataset(tmp_path, num_frames=3, interval=2, width=64, height=64, hand_loss_weight=4.2)[0]
    assert sample["poses"].shape == (3, 3, 64, 64) and sample["poses"].mean() > 0.8  # the inverted guide frames
    assert sample["hand_weights"].unique().tolist() == [1.0]  # no meta_info: no hand boxes


def write_published_dataset(folder: Path, frames: int = 6) -> Path:
    """meta_info.json layout, 64x64: a video whose left half is red, a pose video whose left half is stored
    red too (the published loader swaps it to blue), and per-frame detections with a confident hand box
    ((0.25, 0.25), (0.5, 0.5)) and an unconfident one."""
    frame = np.zeros((64, 64, 3), np.uint8)
    frame[:, :32] = (255, 0, 0)
    write_clip(folder / "v.mp4", [frame] * frames)
    write_clip(folder / "g.mp4", [frame] * frames)
    detections = {"boxes": [[[0.1, 0.1], [0.9, 0.9]]],
                  "hands_boxes": [[[0.25, 0.25], [0.5, 0.5]], [[0.6, 0.6], [0.9, 0.9]]],
                  "hands_score": [[0.8] * 21, [0.3] * 21]}
    (folder / "meta").mkdir()
    (folder / "meta" / "v.json").write_text(json.dumps([detections] * frames))
    (folder / "meta_info.json").write_text(json.dumps([{"video_path": "v.mp4", "guide_path": "g.mp4",
                                                        "meta_info": "meta/v.json"}]))
    return folder


def test_published_layout_pose_colours_and_hand_weights(tmp_path):
    from svd_animate.train.objective import latent_weights

    data = PoseVideoDataset(write_published_dataset(tmp_path), num_frames=3, interval=2, width=64, height=64,
                            hand_loss_weight=4.2)
    sample = data[0]
    # BGR->RGB as published: the red stored in the pose video is blue to the encoder; the RGB video stays red
    assert torch.allclose(sample["poses"][:, :, 32, 8], torch.tensor([0.0, 0.0, 1.0]).expand(3, 3), atol=0.05)
    assert torch.allclose(sample["pixels"][:, :, 32, 8], torch.tensor([1.0, -1.0, -1.0]).expand(3, 3), atol=0.1)
    # 1 + 4 x 0.8 = 4.2 in the confident box: x, y from int(16) - 10 = 6 to int(32) + 10 = 42; frame 0 stays 1
    weights = sample["hand_weights"]
    assert weights[0].unique().tolist() == [1.0]
    expected = torch.ones(64, 64)
    expected[6:42, 6:42] = 4.2
    assert torch.allclose(weights[1:], expected.expand(2, 64, 64))
    # average-pooled to the 8x8 latent grid: per 8-px block, the box covers 2/8, 1, 1, 1, 1, 2/8, 0, 0 of it
    cover = torch.tensor([0.25, 1, 1, 1, 1, 0.25, 0, 0])
    pooled = latent_weights(weights[None], (8, 8))
    assert torch.allclose(pooled[0, 1:, 0], (1 + 3.2 * torch.outer(cover, cover)).expand(2, 8, 8))
    assert pooled[0, 0].unique().tolist() == [1.0]
    unweighted = PoseVideoDataset(tmp_path, num_frames=3, interval=2, width=64, height=64, hand_loss_weight=1.0)
    assert unweighted[0]["hand_weights"].unique().tolist() == [1.0]


def test_our_layout_hand_boxes_at_the_source_size(tmp_path):
    """A 128x128 clip trained at 64x64: the box spans the confident keypoints (source px 32..48) widened by
    10 source px, i.e. 22..58, which is 11..29 after halving; a doubtful keypoint does not stretch it."""
    from pose.skeleton import PoseSequence
    from tests.helpers import make_pose

    frames = 4
    write_clip(tmp_path / "c.mp4", [np.zeros((128, 128, 3), np.uint8)] * frames)
    hands = np.full((2, 21, 2), np.nan, np.float32)
    hands[0, :3] = [[0.25, 0.25], [0.375, 0.375], [0.9, 0.9]]
    pose = make_pose(hands=hands)
    pose["hands_score"][0, 2] = 0.1
    (tmp_path / "poses").mkdir()
    PoseSequence.stack([pose] * frames, 128, 128, fps=10).save(tmp_path / "poses" / "c.npz")
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "svd-animate.dataset", "version": 1, "clips": [
        {"video": "c.mp4", "poses": "poses/c.npz", "frames": frames}], "skipped": []}))
    weights = PoseVideoDataset(tmp_path, num_frames=3, interval=1, width=64, height=64,
                               hand_loss_weight=4.2)[0]["hand_weights"]
    expected = torch.ones(64, 64)
    expected[11:29, 11:29] = 4.2
    assert torch.allclose(weights[1:], expected.expand(2, 64, 64)) and weights[0].unique().tolist() == [1.0]


def test_prepare_data_on_real_clips(shared_data, tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "a.mp4").symlink_to(shared_data / "driving_controlnext_v2_01.mp4")
    (videos / "broken.mp4").write_bytes(b"not a video")
    code, stdout, _ = run_cli(capsys, "prepare-data", "--videos", videos, "-o", tmp_path / "ds", "--max-frames", "6",
                              "--cache-dir", tmp_path / "cache")
    assert code == 0 and "1 clips, 6 frames with poses, 1 skipped" in stdout and "broken.mp4" in stdout
    manifest = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert manifest["clips"][0]["frames"] == 6 and (tmp_path / "ds" / manifest["clips"][0]["poses"]).is_file()
    sample = PoseVideoDataset(tmp_path / "ds", num_frames=3, interval=2, width=64, height=128)[0]
    assert sample["pixels"].shape == (3, 3, 128, 64)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.mp4").write_bytes(b"not a video")
    code, _, stderr = run_cli(capsys, "prepare-data", "--videos", empty, "-o", tmp_path / "ds2")
    assert code == 2 and "no usable clip" in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds2").exists()  # no empty dataset folder, no empty poses/ in it


# ---- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("learning_rat: 0.1\n", "unknown key 'learning_rat'"),
    ("max_steps: ten\n", "key 'max_steps' must be int"),
    ("unet_trainable: attn\n", "key 'unet_trainable' must be list"),
    ("trainable: everything\n", "trainable must be one of encoder"),
])
def test_bad_configs_refused_before_any_model_loads(dataset, tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.setattr(trainer_module, "load_models", lambda config: pytest.fail("a model was loaded"))
    path = tmp_path / "mine.yaml"
    path.write_text("base_model: tiny\n" + text)
    code, _, stderr = run_cli(capsys, "train", "--config", path, "--data", dataset, "--output-dir", tmp_path / "r")
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_8bit_adam_without_bitsandbytes(dataset, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(InputError, match="use_8bit_adam needs bitsandbytes"):
        tiny_config(dataset, tmp_path, use_8bit_adam=True).check()


def test_lr_is_constant_by_default_as_published():
    """train_svd.py's default scheduler is diffusers' "constant", which ignores the warm-up that script.sh
    passes (500): the LR is the full one from the first step. A warm-up stays available."""
    from diffusers.optimization import get_scheduler

    def lrs(config_or_name, steps=3, **kwargs):
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-5)
        scheduler = (get_scheduler(config_or_name, optimizer, **kwargs) if isinstance(config_or_name, str)
                     else trainer_module.make_lr_scheduler(config_or_name, optimizer))
        values = []
        for _ in range(steps):
            values.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return values

    assert lrs("constant", num_warmup_steps=500) == [1e-5] * 3  # the published behaviour
    assert TrainConfig().warmup_steps == 0 and load_train_config("controlnext-svd-v2").warmup_steps == 0
    assert lrs(load_train_config("controlnext-svd-v2")) == [1e-5] * 3
    assert lrs(TrainConfig(warmup_steps=2)) == pytest.approx([0.0, 0.5e-5, 1e-5])
    with pytest.raises(InputError, match="warmup_steps must be 0"):
        TrainConfig(data="d", warmup_steps=-1).check()


def test_time_ids_and_clipping_default_to_the_published_values():
    """train_svd.py tells the UNet (fps 6, motion bucket 127, noise 0.02) and adds that noise to the reference;
    its run clips the gradient norm at 1.0 (DeepSpeed's `gradient_clipping: 1.0`)."""
    for config in (TrainConfig(), load_train_config("controlnext-svd-v2")):
        assert torch.equal(trainer_module.added_time_ids(config, 2), torch.tensor([[6.0, 127.0, 0.02]] * 2))
        assert config.max_grad_norm == 1.0


@pytest.mark.parametrize("changes, message", [
    ({"fps_id": 0}, "fps_id must be at least 1, got 0"),
    ({"motion_bucket_id": -1}, "motion_bucket_id must be 0 or more, got -1"),
    ({"noise_aug_strength": -0.5}, "noise_aug_strength must be 0 or more, got -0.5"),
])
def test_bad_time_ids_refused(changes, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(data="d", **changes).check()


def test_configured_time_ids_reach_the_unet_and_the_reference_noise(dataset):
    """A config's fps_id, motion bucket and noise augmentation are what the UNet is told, and the noise
    augmentation is the std of the noise added to the reference before the VAE encodes it."""
    from svd_controlnext.tiny import tiny_components

    config = tiny_config(dataset, "unused", fps_id=13, motion_bucket_id=200, noise_aug_strength=0.5)
    parts = tiny_components(0)
    unet, encoder = parts["unet"], parts["pose_encoder"]
    batch = torch.utils.data.default_collate([PoseVideoDataset(dataset, 4, 1, 64, 64)[0]])
    time_ids, encoded = [], []
    unet.register_forward_pre_hook(lambda module, args: time_ids.append(args[3]))
    parts["vae"].encoder.register_forward_pre_hook(lambda module, args: encoded.append(args[0]))
    injector = ControlInjector(unet, encoder.config.injection_site, encoder.config.control_strength)
    with torch.no_grad():
        training_loss(batch, parts, unet, encoder, injector, config, torch.Generator().manual_seed(0))
    injector.remove()
    assert torch.equal(time_ids[0], torch.tensor([[12.0, 200.0, 0.5]]))
    added = encoded[1] - batch["reference"]  # the second encoding is the reference's
    assert added.std().item() == pytest.approx(0.5, rel=0.05)


# ---- training ------------------------------------------------------------------------------------

def fixed_batch_loss(encoder, unet, dataset) -> float:
    """The loss of the first three samples at fixed noise levels and noise, averaged over 4 draws."""
    from svd_controlnext.injection import ControlInjector
    from svd_controlnext.tiny import tiny_components

    parts = tiny_components(42)
    data = PoseVideoDataset(dataset, 4, 1, 64, 64, seed=0)
    batch = torch.utils.data.default_collate([data[i] for i in range(3)])
    config = tiny_config(dataset, "unused", drop_image_embedding=0.0, drop_reference_from=0.0, drop_reference_to=0.0)
    injector = ControlInjector(unet, "down_blocks.0", encoder.config.control_strength)
    with torch.no_grad():
        losses = [training_loss(batch, parts, unet, encoder, injector, config,
                                torch.Generator().manual_seed(seed)).item() for seed in range(4)]
    injector.remove()
    return float(np.mean(losses))


def test_training_clip_embedding_is_the_one_inference_computes():
    """The reference's CLIP embedding as training computes it (from the sample's [-1, 1] pixels) equals the
    one the inference pipeline computes from the same image. 448x192: blurred and shrunk down, stretched across."""
    from PIL import Image

    from svd_controlnext.pipeline import ControlNeXtSVDPipeline
    from svd_controlnext.tiny import tiny_components

    parts = tiny_components(0)
    image = np.random.default_rng(0).integers(0, 256, (448, 192, 3), np.uint8)
    seen = []
    hook = parts["image_encoder"].register_forward_hook(lambda module, args, output: seen.append(output.image_embeds))
    pipe = ControlNeXtSVDPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    pipe(Image.fromarray(image), np.zeros((2, 448, 192, 3), np.uint8), height=448, width=192, num_frames=2,
         num_inference_steps=1, output_type="latent")
    hook.remove()
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1  # as PoseVideoDataset makes them
    with torch.no_grad():
        ours = trainer_module.clip_embeddings(parts["image_encoder"], parts["feature_extractor"], pixels)
    inference = seen[0].unsqueeze(1)
    assert len(seen) == 1 and ours.shape == inference.shape == (1, 1, 32)
    assert (ours - inference).abs().max() <= 1e-5 * inference.abs().max()


def test_tiny_training_lowers_the_loss_and_exports_loadable_weights(dataset, tmp_path, capsys):
    from diffusers import UNetSpatioTemporalConditionModel

    from svd_controlnext.encoder import PoseEncoder
    from svd_controlnext.tiny import tiny_components, tiny_pose_encoder

    run = tmp_path / "run"
    code, stdout, _ = run_cli(capsys, "train", "--config", "tiny", "--data", dataset, "--output-dir", run,
                              "--max-steps", "30")
    assert code == 0 and "trained weights after 30 steps" in stdout
    torch.manual_seed(42)
    before = fixed_batch_loss(tiny_pose_encoder(), tiny_components(42)["unet"], dataset)
    after = fixed_batch_loss(PoseEncoder.from_pretrained(run / "final" / "pose_encoder"),
                             UNetSpatioTemporalConditionModel.from_pretrained(run / "final" / "unet"), dataset)
    assert after < 0.7 * before, (before, after)
    # The exported folder drives the main command.
    code, stdout, _ = run_cli(capsys, "--ref", dataset / "clip0.mp4", "--pose", dataset / "poses" / "clip0.npz",
                              "--preset", "tiny", "--weights", run / "final", "-o", tmp_path / "a.mp4")
    assert code == 2  # the reference must be an image
    import cv2

    cv2.imwrite(str(tmp_path / "ref.png"), np.full((64, 64, 3), 90, np.uint8))
    code, stdout, _ = run_cli(capsys, "--ref", tmp_path / "ref.png", "--pose", dataset / "poses" / "clip0.npz",
                              "--preset", "tiny", "--weights", run / "final", "-o", tmp_path / "a.mp4")
    assert code == 0 and "8 frames" in stdout


def test_unet_weights_laid_over_the_base_unet(dataset, tmp_path):
    """As train_svd.py's --unet_model_name_or_path: the base's UNet, then a published-format unet.bin (a
    pickled state dict) with strict=False, so tensors the file lacks keep the base's values; for a real base
    folder and for the tiny one. Training the UNet then starts from those weights."""
    from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

    from svd_controlnext.tiny import tiny_components, tiny_unet

    parts = tiny_components(42)
    parts.pop("pose_encoder")
    StableVideoDiffusionPipeline(**parts).save_pretrained(tmp_path / "base")
    base = parts["unet"].state_dict()
    torch.manual_seed(7)
    tuned = {k: v for k, v in tiny_unet().state_dict().items() if not k.startswith("conv_out")}
    torch.save(tuned, tmp_path / "unet.bin")
    for base_model in (str(tmp_path / "base"), "tiny"):
        config = TrainConfig(base_model=base_model, unet_weights=str(tmp_path / "unet.bin"), pose_encoder=None)
        unet = trainer_module.load_models(config)["unet"].state_dict()
        assert all(torch.equal(unet[k], tuned[k]) for k in tuned), base_model
        assert all(torch.equal(unet[k], base[k]) for k in base if k.startswith("conv_out")), base_model
    with pytest.raises(WeightsError, match="no such file or folder"):
        trainer_module.load_models(TrainConfig(base_model="tiny", unet_weights="Pbihao/ControlNeXt", pose_encoder=None))

    result = train(tiny_config(dataset, tmp_path / "run", trainable="encoder+unet", max_steps=1,
                               unet_weights=str(tmp_path / "unet.bin")), progress=False)
    trained = UNetSpatioTemporalConditionModel.from_pretrained(result.export_dir / "unet").state_dict()
    moved = max((trained[k] - tuned[k]).abs().max().item() for k in tuned)
    assert 0 < moved < 2e-3  # one AdamW step at lr 1e-3 away from the laid-over weights


def test_resume_continues_exactly_like_an_uninterrupted_run(dataset, tmp_path):
    """A warm-up longer than the first leg and EMA make the LR schedule and the EMA state matter too."""
    from safetensors.torch import load_file

    whole = train(tiny_config(dataset, tmp_path / "whole", warmup_steps=3, ema=True), progress=False)
    first = train(tiny_config(dataset, tmp_path / "split", max_steps=2, warmup_steps=3, ema=True), progress=False)
    assert first.losses == pytest.approx(whole.losses[:2], abs=1e-6)
    rest = train(tiny_config(dataset, tmp_path / "split", warmup_steps=3, ema=True), resume="latest", progress=False)
    assert rest.steps == 4 and len(rest.losses) == 2
    assert rest.losses == pytest.approx(whole.losses[2:], abs=1e-5)
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    ema = [load_file(tmp_path / run / "checkpoints" / "step-000004" / "ema.safetensors") for run in ("whole", "split")]
    assert ema[0].keys() == ema[1].keys() and all(torch.allclose(ema[0][k], ema[1][k], atol=1e-6) for k in ema[0])
    assert not list((tmp_path / "split" / "checkpoints").rglob("custom_checkpoint_*"))  # no pickle that runs code


def test_bad_resumes(dataset, tmp_path):
    with pytest.raises(InputError, match="the run folder .*nothing does not exist"):
        train(tiny_config(dataset, tmp_path / "nothing"), resume="latest", progress=False)
    train(tiny_config(dataset, tmp_path / "run", max_steps=2), progress=False)
    with pytest.raises(InputError, match=r"made with another training config \(differs in: learning_rate\)"):
        train(tiny_config(dataset, tmp_path / "run", learning_rate=0.5), resume="latest", progress=False)
    state_file = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer.json"
    state = json.loads(state_file.read_text())
    older = {**state, "fingerprint": "older", "config": dict(state["config"])}
    del older["config"]["unet_weights"]  # a checkpoint from before that key existed; this run's is not the default
    state_file.write_text(json.dumps(older))
    with pytest.raises(InputError, match=r"\(differs in: unet_weights\)"):
        train(tiny_config(dataset, tmp_path / "run"), resume="latest", progress=False)
    for key in ("fps_id", "motion_bucket_id", "noise_aug_strength"):  # keys once constants, at their defaults
        del state["config"][key]
    state_file.write_text(json.dumps({**state, "fingerprint": "older"}))
    resumed = train(tiny_config(dataset, tmp_path / "run", max_steps=3), resume="latest", progress=False)
    assert resumed.steps == 3
    with pytest.raises(InputError, match="not a checkpoint folder"):
        train(tiny_config(dataset, tmp_path / "run"), resume=str(tmp_path), progress=False)


def test_nan_loss_stops_naming_step_and_batch_and_keeps_the_last_checkpoint(dataset, tmp_path, monkeypatch):
    real = trainer_module.edm_loss
    calls = []

    def nan_at_third(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(trainer_module, "edm_loss", nan_at_third)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 \(batch: clip\d\.mp4\); stopped, the last good "
                                         r"checkpoint is .*step-000002"):
        train(tiny_config(dataset, tmp_path / "run"), progress=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-000002"]
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("mode", ["encoder", "encoder+unet-subset", "lora"])
def test_what_trains_is_configuration(dataset, tmp_path, mode):
    from diffusers import UNetSpatioTemporalConditionModel

    from svd_controlnext.tiny import tiny_components

    result = train(tiny_config(dataset, tmp_path / "run", trainable=mode, max_steps=2, ema=mode == "lora",
                               validate_every=2), progress=False)
    assert (result.export_dir / "pose_encoder" / "config.json").is_file()
    assert (tmp_path / "run" / "validation" / "step-000002.mp4").stat().st_size > 0
    base = tiny_components(42)["unet"].state_dict()
    if mode == "encoder":
        assert not (result.export_dir / "unet").exists()
        return
    trained = UNetSpatioTemporalConditionModel.from_pretrained(result.export_dir / "unet").state_dict()
    assert trained.keys() == base.keys()  # LoRA merged into plain UNet weights
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    if mode == "encoder+unet-subset":
        assert changed and all("to_out" in k for k in changed)
    else:
        assert changed and all(any(t in k for t in ("to_q", "to_k", "to_v", "to_out")) for k in changed)


def test_losses_and_learning_rate_go_to_tensorboard(dataset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config(dataset, tmp_path / "run", max_steps=3, warmup_steps=2), progress=False)
    events = EventAccumulator(str(next((tmp_path / "run" / "logs").rglob("events.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([5e-4, 1e-3, 1e-3])


def test_two_processes_data_parallel(dataset, tmp_path):
    command = [sys.executable, "-m", "svd_controlnext", "-q", "train", "--config", "tiny", "--data", str(dataset),
               "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--num-processes", "2"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained weights after 2 steps") == 1  # the main process exports
    assert (tmp_path / "run" / "final" / "unet" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "trainer.json").is_file()


def test_gradient_checkpointing_gives_the_same_training(dataset, tmp_path):
    plain = train(tiny_config(dataset, tmp_path / "a", max_steps=2), progress=False)
    checkpointed = train(tiny_config(dataset, tmp_path / "b", max_steps=2, gradient_checkpointing=True),
                         progress=False)
    assert checkpointed.losses == pytest.approx(plain.losses, abs=1e-5)


def record_loss_calls(monkeypatch) -> list[dict]:
    """Each `training_loss` call of a run: its batch's clips and its noise generator's seed."""
    real, calls = trainer_module.training_loss, []

    def recorded(batch, *args):
        calls.append({"index": batch["index"].tolist(), "seed": args[-1].initial_seed()})
        return real(batch, *args)

    monkeypatch.setattr(trainer_module, "training_loss", recorded)
    return calls


def loss_by_hand(config: TrainConfig, index: list[int], step: int, micro_step: int) -> float:
    """The loss of the clips `index` (epoch 0) at the starting weights in fp32, with the noise of (step, micro-step)."""
    models = trainer_module.load_models(config)
    unet, encoder = models["unet"], models["pose_encoder"]
    data = PoseVideoDataset(config.data, config.num_frames, config.interval, config.width, config.height, config.seed,
                            config.hand_loss_weight)
    batch = torch.utils.data.default_collate([data[i] for i in index])
    injector = ControlInjector(unet, encoder.config.injection_site, encoder.config.control_strength)
    with torch.no_grad():
        loss = training_loss(batch, models, unet, encoder, injector, config,
                             trainer_module.step_generator(config.seed, step, micro_step, 0))
    injector.remove()
    return loss.item()


def test_bf16_only_rounds_the_first_step(dataset, tmp_path, monkeypatch):
    """The first step sees the batch, noise and weights it sees in fp32: bf16 rounds its loss, no more."""
    calls = record_loss_calls(monkeypatch)
    config = tiny_config(dataset, tmp_path / "run", max_steps=2, mixed_precision="bf16")
    result = train(config, progress=False)
    assert result.steps == 2 and len(result.losses) == 2
    fp32 = loss_by_hand(config, calls[0]["index"], step=0, micro_step=0)
    assert result.losses[0] == pytest.approx(fp32, rel=1e-2) and result.losses[0] != fp32


def test_accumulation_steps_after_the_last_micro_batch_and_reports_its_loss(dataset, tmp_path, monkeypatch):
    """Accumulating 2 batches of 1 over an epoch of 3 clips: step 1 takes micro-batches 0 and 1, step 2 the
    epoch's last one alone (accelerate ends an accumulation with the epoch); each micro-batch has the noise
    of its (step, micro-step). A step's loss is its last micro-batch's, before the optimiser moves."""
    calls = record_loss_calls(monkeypatch)
    config = tiny_config(dataset, tmp_path / "run", max_steps=2, gradient_accumulation=2, batch_size=1)
    result = train(config, progress=False)
    assert result.steps == 2 and len(result.losses) == 2
    assert [c["seed"] for c in calls] == [trainer_module.step_generator(config.seed, step, micro, 0).initial_seed()
                                          for step, micro in ((0, 0), (0, 1), (1, 0))]
    assert sorted(i for c in calls for i in c["index"]) == [0, 1, 2]  # one epoch
    assert result.losses[0] == pytest.approx(loss_by_hand(config, calls[1]["index"], 0, 1), rel=1e-5)


def test_resume_with_accumulation_across_epoch_ends(dataset, tmp_path):
    """With an epoch's end inside an accumulation, steps x accumulation is not the number of batches drawn:
    the checkpoint records it, so the resumed run draws the batches the uninterrupted one draws."""
    whole = train(tiny_config(dataset, tmp_path / "whole", gradient_accumulation=2), progress=False)
    train(tiny_config(dataset, tmp_path / "split", max_steps=2, gradient_accumulation=2), progress=False)
    state = json.loads((tmp_path / "split" / "checkpoints" / "step-000002" / "trainer.json").read_text())
    assert (state["step"], state["batches"]) == (2, 3)
    rest = train(tiny_config(dataset, tmp_path / "split", gradient_accumulation=2), resume="latest", progress=False)
    assert rest.losses == pytest.approx(whole.losses[2:], abs=1e-5)
