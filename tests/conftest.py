import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

from tests.helpers import SHARED_DATA  # noqa: E402


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's pose cache or hub cache."""
    monkeypatch.setenv("SVD_ANIMATE_CACHE", str(tmp_path / "pose-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("SVD_ANIMATE_DWPOSE_DIR", raising=False)


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real clips not available: {SHARED_DATA} is absent (it sits beside the repo in CI)")
    return SHARED_DATA


# Left out of `make test-fast` (pytest -m "not slow"): whole files, or tests by name (every parametrisation),
# chosen by measured time on 2 shared cores (about 1 s and more); what stays is every module's unit tests.
# tests/test_slow_marker.py checks that each name here is a test that exists.
ALL = "*"
SLOW = {
    "test_animate.py": {
        "test_output_keeps_the_audio_and_the_reference_pose_first_adds_a_silent_frame",
        "test_published_sampling_end_to_end", "test_default_command_on_the_tiny_preset",
        "test_the_same_run_twice_gives_the_same_bytes_in_the_container_the_name_asks",
        "test_each_reference_is_detected_once_for_many_jobs", "test_target_fps_keeps_a_slow_clip_at_its_own_rate",
        "test_poses_npz_as_input", "test_seed_minus_one_draws_a_seed_and_prints_it"},
    "test_attention.py": {"test_apply_is_idempotent_and_removable",
                          "test_unet_output_on_cpu_is_bit_identical_when_wrapped"},
    "test_batch.py": {"test_sigkill_then_rerun_finishes_the_rest", "test_batch_runs_skips_and_reports",
                      "test_two_processes_do_each_job_once_and_merge_one_report", "test_dry_run_lists_cache_and_skips"},
    "test_bench_acceptance.py": ALL,
    "test_window_parallel.py": {
        "test_two_processes_give_one_process_latents_bit_for_bit",
        "test_three_windows_over_a_frame_differ_by_rounding_only",
        "test_each_process_runs_its_windows_and_deep_cache_keeps_their_features",
        "test_frames_decoded_in_shared_chunks_reach_process_0_in_order",
        "test_work_done_once_reaches_every_process_with_its_error", "test_num_processes_2_writes_the_same_mp4_bytes_poses_extracted_by_process_0",
        "test_a_bad_input_is_one_line_before_any_process_starts"},
    "test_ray_batch.py": {
        "test_ray_outputs_and_report_are_the_one_process_batchs_and_a_rerun_finishes_the_rest",
        "test_a_worker_killed_in_a_job_has_its_job_run_again_once",
        "test_ctrl_c_stops_the_workers_reports_what_finished_and_a_rerun_finishes_the_rest",
        "test_the_same_errors_as_the_local_batch_before_anything_is_written"},
    "test_comfyui.py": {"test_the_example_workflows_run_on_the_tiny_preset_and_give_the_clis_frames",
                        "test_interrupt_stops_sampling_at_the_next_step",
                        "test_load_lists_the_model_folders_and_frees_comfyuis_models"},
    "test_compile.py": {
        "test_compiled_fast_sampling_and_decoding_equal_eager_and_do_not_retrace_for_more_windows_or_steps"},
    "test_fast_sampling.py": {
        "test_deep_cache_in_the_pipeline_skips_the_encoder_on_cached_steps_and_passes_through_after",
        "test_a_stochastic_scheduler_draws_its_noise_from_the_generator_once_per_step",
        "test_fast_run_end_to_end_on_the_tiny_preset",
        "test_limited_interval_guidance_runs_the_unconditional_half_only_inside_the_interval",
        "test_a_cached_step_reuses_the_deep_feature_and_a_guided_one_serves_the_conditional_half",
        "test_ays_sigmas_reach_the_unet_as_svds_continuous_timesteps",
        "test_deep_cache_full_steps_are_exact_and_detach_leaves_the_unet_as_it_was"},
    "test_injection.py": {"test_tiny_components_fit_together"},
    "test_pipeline.py": {
        "test_overlap_features_reused_equal_encoding_every_window", "test_half_precision_stays_close_to_fp32",
        "test_compiled_unet_has_no_graph_break_and_no_recompile", "test_sequential_offload_gives_the_same_frames",
        "test_windows_cover_a_longer_video", "test_control_scale_really_scales_and_encoder_runs_once_per_step",
        "test_detach_control_leaves_the_plain_unet", "test_model_cpu_offload_gives_the_same_frames",
        "test_a_training_loops_control_hook_is_shared_and_kept", "test_feed_forward_chunking_gives_the_same_frames",
        "test_plain_svd_folder_plus_a_pose_encoder"},
    "test_published_parity.py": ALL,
    "test_train.py": {
        "test_prepare_data_on_real_clips", "test_training_clip_embedding_is_the_one_inference_computes",
        "test_tiny_training_lowers_the_loss_and_exports_loadable_weights",
        "test_unet_weights_laid_over_the_base_unet", "test_resume_continues_exactly_like_an_uninterrupted_run",
        "test_bad_resumes", "test_nan_loss_stops_naming_step_and_batch_and_keeps_the_last_checkpoint",
        "test_what_trains_is_configuration", "test_losses_and_learning_rate_go_to_tensorboard",
        "test_two_processes_data_parallel", "test_gradient_checkpointing_gives_the_same_training",
        "test_bf16_only_rounds_the_first_step", "test_resume_with_accumulation_across_epoch_ends",
        "test_accumulation_steps_after_the_last_micro_batch_and_reports_its_loss"},
    "test_ui.py": {
        "test_animation_job_writes_the_video_and_poses_with_models_loaded_once",
        "test_cancel_stops_sampling_at_once_and_leaves_nothing", "test_a_second_job_waits_for_the_first",
        "test_the_result_keeps_the_driving_clips_audio", "test_fps_picks_the_stride_once_for_both_steps",
        "test_pose_job_saves_the_aligned_poses_and_a_three_panel_preview"},
    "test_ui_api.py": ALL,
    "test_ui_browser.py": ALL,
    "test_user_files.py": {"test_sigterm_while_writing_exits_143_in_one_line_and_leaves_no_part",
                           "test_nan_latents_stop_the_job_before_any_video_is_written",
                           "test_sigterm_stops_the_web_page_server_with_143"},
    "test_job.py": {"test_an_animation_job_runs_its_stages_and_reports_sampling_in_steps"},
    "test_weights.py": {"test_convert_writes_a_folder_that_from_pretrained_loads"},
    "test_weights_unet.py": {"test_the_other_forms_of_unet_weights"},
}


def is_slow(nodeid: str) -> bool:
    """Whether a test's node id ("tests/FILE::NAME[params]") is listed in SLOW."""
    path, _, name = nodeid.partition("::")
    listed = SLOW.get(Path(path).name, ())
    return listed == ALL or name.split("[")[0] in listed


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_slow(item.nodeid):
            item.add_marker(pytest.mark.slow)
