"""Defaults that the README's differences tables say match the published code."""

from svd_animate.config import AnimateConfig, load_preset


def test_own_yaml_on_the_published_weights_conditions_as_the_preset(tmp_path):
    """The published pipeline conditions on motion bucket 128 whatever run_controlnext.py passes (127): a YAML
    of one's own that leaves the key out gets what the published preset gets."""
    mine = tmp_path / "mine.yaml"
    mine.write_text("base_model: stabilityai/stable-video-diffusion-img2vid-xt-1-1\n"
                    "control_weights: Pbihao/ControlNeXt\nunet_weights: Pbihao/ControlNeXt\n")
    preset = load_preset("controlnext-svd-v2")
    assert AnimateConfig().motion_bucket_id == load_preset(str(mine)).motion_bucket_id == preset.motion_bucket_id == 128
    assert (preset.fps_id - 1, preset.noise_aug_strength) == (6, 0.02)
