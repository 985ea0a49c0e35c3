"""Several processes from one command (`--num-processes N`), started by torchrun as `accelerate launch`
would start them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def launch_processes(num_processes: int, argv: list[str]) -> int:
    """Run `svd-animate ARGV` as N processes of one torch.distributed group on this machine, each with
    its share of the CPU threads; returns the worst exit status."""
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
               "-m", "svd_animate", *argv]
    process = subprocess.Popen(command, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM here: torchrun passes SIGTERM on to the workers, which clean up
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        raise


def window_parallel_run(run):
    """This process's `RunSettings` in a group started by torchrun or `accelerate launch` that shares one video
    (`svd_controlnext/parallel.py`): the group joined (gloo on the CPU, nccl on CUDA) as accelerate joins it, the
    process's GPU (cuda:LOCAL_RANK) unless --device names a device."""
    import dataclasses

    import torch
    from accelerate import PartialState

    from svd_controlnext.parallel import WindowParallel

    state = PartialState(cpu=not torch.cuda.is_available() or (run.device or "").startswith("cpu"))
    device = run.device or (str(state.device) if state.device.type == "cuda" else "cpu")
    return dataclasses.replace(run, device=device, parallel=WindowParallel(state.process_index, state.num_processes))
