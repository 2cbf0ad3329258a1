"""Train the oracle on fresh generator scenes and report its accuracy on scenes it never saw.

    python -m studio.toyworld.train_oracle [--scenes 6000] [--epochs 8] [--out assets/toy-oracle.safetensors]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .oracle import COLOUR_NAMES, Oracle, OracleNet, crop, segment
from .scenes import ALL_SHAPES, STYLES, make_scene

TEST_SEED_OFFSET = 1_000_000


def labelled_crops(seeds) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The oracle's own segments, each a crop labelled by the generator object it mostly overlaps."""
    xs, ys = [], []
    for seed in seeds:
        scene = make_scene(int(seed), held_out=True)
        for m in segment(scene.image):
            obj = max(scene.objects, key=lambda o: (o.mask & m).sum())
            if (obj.mask & m).sum() >= 0.5 * m.sum():
                xs.append(crop(scene.image, m))
                ys.append((ALL_SHAPES.index(obj.shape), COLOUR_NAMES.index(obj.colour), STYLES.index(obj.style)))
    y = torch.tensor(ys)
    return torch.stack(xs), {"shape": y[:, 0], "colour": y[:, 1], "style": y[:, 2]}


def accuracy(net: OracleNet, x, y) -> dict[str, float]:
    net.eval()
    with torch.no_grad():
        out = {k: torch.cat([net(x[i:i + 512])[k] for i in range(0, len(x), 512)]) for k in y}
    return {k: float((out[k].argmax(-1) == y[k]).float().mean()) for k in y}


def train(scenes: int = 6000, epochs: int = 8, seed: int = 0, log=print) -> tuple[Oracle, dict[str, float]]:
    torch.manual_seed(seed)
    t = time.time()
    x, y = labelled_crops(range(seed * scenes, (seed + 1) * scenes))
    xt, yt = labelled_crops(range(TEST_SEED_OFFSET, TEST_SEED_OFFSET + 1000))
    log(f"{len(x)} training crops, {len(xt)} test crops ({time.time() - t:.0f} s)")
    net = OracleNet()
    opt = torch.optim.AdamW(net.parameters(), 3e-3, weight_decay=1e-4)
    steps = epochs * ((len(x) + 127) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    for epoch in range(epochs):
        net.train()
        for idx in torch.randperm(len(x)).split(128):
            xb = x[idx]
            if torch.rand(()) < 0.5:  # mirror: no attribute depends on handedness
                xb = xb.flip(-1)
            out = net(xb)
            loss = sum(F.cross_entropy(out[k], y[k][idx]) for k in y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"epoch {epoch + 1}/{epochs}: loss {loss.item():.4f}, test {accuracy(net, xt, yt)} ({time.time() - t:.0f} s)")
    return Oracle(net.eval()), accuracy(net, xt, yt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenes", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="assets/toy-oracle.safetensors")
    args = ap.parse_args()
    oracle, acc = train(args.scenes, args.epochs, args.seed)
    save_file({k: v.contiguous() for k, v in oracle.net.state_dict().items()}, args.out)
    print("accuracy on fresh generator objects:", {k: f"{v:.2%}" for k, v in acc.items()})
    print("wrote", args.out)


if __name__ == "__main__":
    main()
