"""What one call costs at 1 token on this machine: the floor under `ccli bench --layer`'s 1-token row.

    python examples/call_overhead.py

At one token a UltraFastBERT-shaped FFF layer (BERT-base: hidden 768, depth 11) computes 12 neurons,
about 18k multiply-accumulates, while the dense FFN reads 19 MB of weights; what is left of the FFF's
time is the cost of calling it. This prints, on one thread, the best-of-5 mean time of calls that do
less and less, next to the dense FFN, and the time per call that a given speedup would need.
"""

import time

import torch
from torch import nn

from ccli.kernels import fff as fff_op
from ccli.kernels import native
from ccli.variants.fff import FFF

HIDDEN, WIDTH = 768, 3072


def microseconds(fn, calls: int = 20000) -> float:
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def main() -> None:
    torch.set_num_threads(1)
    x = torch.randn(1, HIDDEN)
    with torch.inference_mode():
        layer = FFF(HIDDEN, trees=1, depth=11, leaf_width=1).eval()
        dense = nn.Sequential(nn.Linear(HIDDEN, WIDTH), nn.GELU(), nn.Linear(WIDTH, HIDDEN)).eval()
        identity = nn.Identity()
        layer(x)  # builds or loads the native kernel
        w_in, b_in, w_out, b_out, _ = layer._kernel_weights()
        calls = {
            "nn.Identity module call": lambda: identity(x),
            "torch.neg (dispatcher, new output)": lambda: torch.neg(x),
        }
        extension = native._ext  # None when the native kernel could not be built
        if extension is not None:
            calls["FFF C++ kernel called directly"] = lambda: extension.fff_forward(
                x, w_in, b_in, w_out, 1, 11, 1, "gelu", b_out)
        calls["ccli::fff op (ccli.kernels.fff.fff)"] = lambda: fff_op.fff(x, w_in, b_in, w_out, 1, 11, 1, "gelu", b_out)
        calls["FFF module call (1 x 11 x 1)"] = lambda: layer(x)
        times = {name: microseconds(fn) for name, fn in calls.items()}
        times["dense FFN module call"] = dense_us = microseconds(lambda: dense(x), calls=300)
    for name, us in times.items():
        print(f"{name:38s} {us:9.2f} us")
    ratio = dense_us / times["FFF module call (1 x 11 x 1)"]
    print(f"FFF speedup at 1 token: {ratio:.1f}x; 200x would need {dense_us / 200:.2f} us per call")


if __name__ == "__main__":
    main()
