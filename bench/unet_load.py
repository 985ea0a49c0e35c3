"""Host memory of loading a published-format unet.bin: the published way vs `load_unet`. Prints JSON.

The real unet.bin (6.1 GB) cannot be downloaded here, so the work folder gets a stand-in of the same kind:
a base model folder (`unet/` by save_pretrained, safetensors) holding a UNet with the real SVD widths
(320/640/1280 channels, CrossAttn/CrossAttn/Down blocks, 1 layer per block: 520 M parameters, 2.08 GB in
fp32; the real UNet has 1.52 B, 6.1 GB), a zip-pickled full state dict of it with other values (the
published file's format) and a second one with 3 keys left out (so the base's own UNet is needed too).

Each case runs in a fresh subprocess:
- published: `from_pretrained(base, subfolder="unet", low_cpu_mem_usage=True)`, then
  `load_state_dict(<the whole pickle in memory>, strict=False)` (ControlNeXt-SVD-v2/run_controlnext.py; the
  bench reads it with weights_only=True, which costs the same memory; this was also the memory profile of our
  old `load_unet_checkpoint`);
- load_unet_<dtype>[_partial]_first: `load_unet` with an empty conversion cache (converts, then loads);
- load_unet_<dtype>[_partial]_cached: the same again, reusing the converted file.
After loading, every weight is read once (as moving the model to a GPU does), so mapped files count.
peak_rss_gib is VmHWM (peak RSS: anonymous plus file-backed pages); file-backed pages of a mapped checkpoint
are page cache the kernel can drop under pressure. peak_anon_gib / peak_file_gib are the largest RssAnon /
RssFile sampled every 5 ms: anonymous memory is what cannot be dropped. import_rss_gib is the process
after importing torch + diffusers, before loading.
Page cache is warm for every case but the first read of each file (times are indicative; memory is not affected).

Run: .venv/bin/python bench/unet_load.py [--workdir DIR] [--keep]   (about 3 minutes on 2 cores; 12 GB of temp disk)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30
DROPPED = ("conv_in.weight", "down_blocks.1.resnets.0.temporal_res_block.conv1.weight",
           "down_blocks.0.attentions.1.proj_in.weight")
CASES = ("published", "load_unet_float32_first", "load_unet_float32_cached", "load_unet_float16_first",
         "load_unet_float16_cached", "load_unet_float32_partial_first", "load_unet_float32_partial_cached")


def bench_unet_config() -> dict:
    return dict(block_out_channels=(320, 640, 1280), layers_per_block=1, num_attention_heads=(5, 10, 20),
                down_block_types=("CrossAttnDownBlockSpatioTemporal",) * 2 + ("DownBlockSpatioTemporal",),
                up_block_types=("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 2)


def build(workdir: Path) -> dict:
    """The base folder and the two zip-pickled checkpoints (skipped when already there)."""
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    if not (workdir / "partial.bin").is_file():
        torch.manual_seed(0)
        unet = UNetSpatioTemporalConditionModel(**bench_unet_config())
        unet.save_pretrained(workdir / "base" / "unet")
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(1e-3)
        state = unet.state_dict()
        torch.save(state, workdir / "unet.bin")
        torch.save({k: v for k, v in state.items() if k not in DROPPED}, workdir / "partial.bin")
        del unet, state
    return {"checkpoint_gb": round((workdir / "unet.bin").stat().st_size / 1e9, 3)}


class Sampler(threading.Thread):
    """Largest RssAnon and RssFile of this process, read from /proc every 5 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kb = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for key, kb in status_kb("RssAnon", "RssFile").items():
                self.peak_kb[key] = max(self.peak_kb[key], kb)
            time.sleep(0.005)


def status_kb(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in kB. VmHWM is the peak RSS of this program: unlike ru_maxrss it does
    not inherit the parent's peak across fork + exec."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {key: int(fields[key].split()[0]) for key in keys}


def child(case: str, workdir: Path) -> dict:
    sampler = Sampler()
    sampler.start()
    import torch
    from diffusers import UNetSpatioTemporalConditionModel

    from svd_controlnext.weights import load_unet

    import_rss = status_kb("VmRSS")["VmRSS"] * 1024
    base = str(workdir / "base")
    start = time.perf_counter()
    if case == "published":
        unet = UNetSpatioTemporalConditionModel.from_pretrained(base, subfolder="unet", low_cpu_mem_usage=True)
        unet.load_state_dict(torch.load(workdir / "unet.bin", map_location="cpu", weights_only=True), strict=False)
    else:
        dtype = torch.float16 if "float16" in case else torch.float32
        source = workdir / ("partial.bin" if "partial" in case else "unet.bin")
        unet = load_unet(base, source, dtype, cache_dir=workdir / "cache")
    load_s = time.perf_counter() - start
    with torch.no_grad():
        checksum = float(sum(p.float().sum() for p in unet.parameters()))  # reads every weight once
    sampler.stop.set()
    sampler.join()
    return {"peak_rss_gib": round(status_kb("VmHWM")["VmHWM"] * 1024 / GIB, 3),
            "peak_anon_gib": round(sampler.peak_kb["RssAnon"] * 1024 / GIB, 3),
            "peak_file_gib": round(sampler.peak_kb["RssFile"] * 1024 / GIB, 3),
            "import_rss_gib": round(import_rss / GIB, 3), "load_s": round(load_s, 2),
            "dtype": str(next(unet.parameters()).dtype), "checksum": round(checksum, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the 2 GB files go (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (reused by a later --workdir run)")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        print(json.dumps(build(args.workdir)))
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.workdir)))
        return 0
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="unet-load-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        built = subprocess.run([sys.executable, __file__, "--build", "--workdir", str(workdir)], capture_output=True,
                               text=True, env=env, check=True)  # a separate process: this one stays small
        result = {"machine": f"{platform.machine()} {os.cpu_count()} cores",
                  **json.loads(built.stdout.splitlines()[-1])}
        shutil.rmtree(workdir / "cache", ignore_errors=True)
        runs = {}
        for case in CASES:
            out = subprocess.run([sys.executable, __file__, "--child", case, "--workdir", str(workdir)],
                                 capture_output=True, text=True, env=env, check=True)
            runs[case] = json.loads(out.stdout.strip().splitlines()[-1])
        result["runs"] = runs
        published = runs["published"]
        for run in ("first", "cached"):
            ours = runs[f"load_unet_float32_{run}"]
            for figure in ("peak_rss", "peak_anon"):
                ratio = ours[f"{figure}_gib"] / published[f"{figure}_gib"]
                result[f"{figure}_ratio_{run}_vs_published"] = round(ratio, 3)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
