"""Large and hostile inputs: time and resident memory of each, with the plain way (PIL decoding the whole
file, Python's `re`) beside the studio's in the same run where there is one.

    python bench/bench_abuse.py [--side 13000] [--images 10] [--out bench/results/abuse.json]

Resident memory is read from /proc/self/status: peak (VmHWM, reset before each case) and after the case.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import write_json  # noqa: E402
from studio.customize.images import load_images  # noqa: E402
from studio.errors import StudioError  # noqa: E402
from studio.generation import GenerationRequest  # noqa: E402
from studio.layer_scale import scale_edit  # noqa: E402
from studio.manager import PipelineManager, trim_heap  # noqa: E402


def rss_mb() -> tuple[float, float]:
    """(now, peak since the last reset) resident memory in MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def measure(name: str, fn, rows: list) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before, _ = rss_mb()
    start = time.perf_counter()
    try:
        outcome = fn() or "ok"
    except StudioError as exc:
        outcome = f"refused: {str(exc)[:70]}"
    seconds = time.perf_counter() - start
    trim_heap()  # what every studio job ends with
    after, peak = rss_mb()
    rows.append(dict(case=name, seconds=round(seconds, 2), rss_before_mb=round(before), peak_mb=round(peak),
                     rss_after_mb=round(after), outcome=outcome))
    print(f"{name:<46}{seconds:>8.2f}s{before:>9.0f}{peak:>9.0f}{after:>9.0f}  {outcome}", flush=True)


def plain_re(limit: float = 10.0) -> str:
    """Python's `re` on one parameter name with the pattern, in a child process (it does not return)."""
    code = "import re; re.search(r'(.*.*)*Z', 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight')"
    try:
        subprocess.run([sys.executable, "-c", code], timeout=limit, check=True)
    except subprocess.TimeoutExpired:
        return f"still running after {limit:g} s (killed)"
    return "returned"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=13000, help="side of the huge pictures (pixels)")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--edits", type=int, default=40, help="whole-UNet scale edits in the big edit file")
    ap.add_argument("--out", default="bench/results/abuse.json")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-abuse-"))
    ramp = np.linspace(0, 255, args.side, dtype=np.uint8)
    huge = [folder / f"huge-{i}.png" for i in range(args.images)]
    for i, path in enumerate(huge):  # a ramp, each picture its own colour: cheap to write, full size to decode
        Image.fromarray(np.stack([np.broadcast_to(ramp, (args.side, args.side)), np.full((args.side, args.side), 20 * i,
                                  np.uint8), np.broadcast_to(ramp[:, None], (args.side, args.side))], -1)).save(path, compress_level=1)
    m = PipelineManager("builtin", device="cpu")
    m.pipe
    rows: list = []
    print(f"{'case':<46}{'time':>9}{'RSS':>9}{'peak':>9}{'after':>9}  (MiB)")
    measure(f"plain PIL: decode {args.images} x {args.side}² whole", lambda: [np.asarray(Image.open(p).convert("RGB"))
                                                                    .shape for p in huge] and None, rows)
    measure(f"customize: {args.images} images of {args.side}²", lambda: load_images(huge, 64)[1][0], rows)
    from studio.attention.any_image import image_maps

    for k in range(3):
        measure(f"attention upload {args.side}², call {k + 1}",
                lambda: image_maps(m, str(huge[0]), "a red circle", repeats=1) and None, rows)
    measure("prompt of 4 MB", lambda: m.generate(GenerationRequest("red " * 1_000_000, steps=1)), rows)
    measure("plain re: layer pattern (.*.*)*Z", plain_re, rows)
    measure("layer pattern (.*.*)*Z", lambda: m.apply(scale_edit(r"(.*.*)*Z", 0.5)), rows)
    for _ in range(args.edits):
        m.apply(scale_edit(r"^unet\.(down|up)_blocks", 0.999))
    m.save_edits(folder / "big.safetensors")
    m.reset()
    del m.stack.entries[:]
    trim_heap()
    measure(f"load an edit file of {args.edits} UNet-wide edits", lambda: f"{len(m.load_edits(folder / 'big.safetensors'))}"
            " applied", rows)
    write_json(args.out, {"side": args.side, "images": args.images, "rows": rows})


if __name__ == "__main__":
    main()
