"""Record torch.amp.GradScaler's scale after each update for fixed sequences of
found-inf flags: tests/fixtures/gradscaler.json, replayed by src/train/scaler.rs's
test (tests/scaler.rs).

Each step really runs the scaler: a one-parameter SGD whose gradient is set to
a finite value or to inf, then scaler.step() (which unscales and finds the
inf itself) and scaler.update(). Run with the reference venv:
    /work/.venv-ref/bin/python scripts/gradscaler_fixture.py
"""

import json
import random
import sys
from pathlib import Path

import torch


def run(flags, **kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", **kw)
    scales, trackers, stepped = [], [], []
    for inf in flags:
        opt.zero_grad()
        loss = scaler.scale(p.sum())
        loss.backward()
        if inf:
            p.grad.fill_(float("inf"))
        before = p.detach().clone()
        scaler.step(opt)
        scaler.update()
        stepped.append(bool((p.detach() != before).any()))
        st = scaler.state_dict()
        scales.append(st["scale"])
        trackers.append(st["_growth_tracker"])
    return {
        "params": {
            "init_scale": kw.get("init_scale", 2.0**16),
            "growth_factor": kw.get("growth_factor", 2.0),
            "backoff_factor": kw.get("backoff_factor", 0.5),
            "growth_interval": kw.get("growth_interval", 2000),
        },
        "found_inf": [bool(f) for f in flags],
        "scale": scales,
        "growth_tracker": trackers,
        "stepped": stepped,
    }


def main():
    rng = random.Random(13)
    cases = []
    # Defaults, a short sequence (no growth within it).
    cases.append(run([0, 1, 0, 0, 1, 1, 0, 0, 0, 1, 0]))
    # Growth every 3 clean steps: long clean runs, backoffs, a restart of
    # the count after an inf, scales above and below the start.
    flags = [0] * 7 + [1] + [0] * 2 + [1, 1, 1] + [0] * 9 + [1] + [0] * 5
    flags += [1 if rng.random() < 0.3 else 0 for _ in range(60)]
    cases.append(run(flags, init_scale=4.0, growth_interval=3))
    # Other factors (not powers of two) and an interval of 1.
    flags = [1 if rng.random() < 0.4 else 0 for _ in range(40)]
    cases.append(run(flags, init_scale=1000.0, growth_factor=3.0, backoff_factor=0.25, growth_interval=1))
    # Growth stopping at f32's largest power of two (the next would be inf).
    cases.append(run([0] * 8, init_scale=2.0**124, growth_interval=2))
    out = {"torch": torch.__version__, "cases": cases}
    path = Path(__file__).resolve().parent.parent / "tests/fixtures/gradscaler.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path} (torch {torch.__version__})", file=sys.stderr)


if __name__ == "__main__":
    main()
