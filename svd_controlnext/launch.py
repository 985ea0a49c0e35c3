"""Several processes from one command (`--num-processes N`), the way `accelerate launch` starts them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def launch_processes(num_processes: int, argv: list[str]) -> int:
    """`--num-processes N`: run this command N times as one torch.distributed group (what
    `accelerate launch` does), each with its share of the CPU threads; the worst exit status wins."""

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    children = []
    for rank in range(num_processes):
        env = {**os.environ, "WORLD_SIZE": str(num_processes), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(num_processes), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
        children.append(subprocess.Popen([sys.executable, "-m", "svd_controlnext", *argv], env=env))
    try:
        codes = [child.wait() for child in children]
    except KeyboardInterrupt:
        for child in children:
            child.terminate()
        raise
    return max(codes)
