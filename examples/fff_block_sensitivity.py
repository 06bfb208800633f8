"""How much does each block's tree cost the model? (the per-block table in docs/experiments.md)

    python examples/fff_block_sensitivity.py [BLOCK:DEPTH:WIDTH ...]
        (default: every block of the embedded default model at 1 x 1 x 760, 1 x 2 x 380, 1 x 3 x 190
        and 1 x 4 x 96)

Each job converts one block of the embedded default model alone into one tree of the given depth
and leaf width (layer-wise distillation as `ccli convert` does it: 300 steps on 32k calibration
tokens of the shuffled training text with short spans; no end-to-end stage) and scores the model on
the whole bundled held-out split (343 paragraphs; `convert` scores the first 256): pooled-embedding
cosine (mean / worst) and retrieval agreement with the original. 1 - cosine is what that block's tree costs; comparing the costs across blocks and widths
tells whether spending the neurons unevenly (wide leaves where a block is sensitive, narrow where it
is not) could beat the same width everywhere at the same FLOPs. About 1-2 minutes per job on 1 thread.
"""

import copy
import sys
import time

import torch

import ccli
from ccli.data import load_paragraphs, training_text
from ccli.distill import DistillConfig, distill, tokenize
from ccli.errors import CcliError
from ccli.measure.fidelity import compare
from ccli.variants.fff import FFFVariant

SHAPES = [(1, 760), (2, 380), (3, 190), (4, 96)]


def main(jobs: list[tuple[int, int, int]]) -> None:
    torch.set_num_threads(1)
    teacher, tokenizer = ccli.load("minilm")
    teacher.eval()
    heldout = load_paragraphs(None, "heldout")
    batches = tokenize(tokenizer, training_text(None, 0.5, 0), 128)
    print("block  tree         neurons/token  pooled cosine (mean / worst)  agreement")
    for block, depth, width in jobs:
        start = time.perf_counter()
        student = copy.deepcopy(teacher)
        distill(student, teacher, FFFVariant(1, depth, width), batches,
                DistillConfig(steps=300, lr=1e-3, tokens=32768, layers=[block]))
        scores = compare(student.eval(), teacher, tokenizer, heldout, 128)
        print(f"{block:>5}  1 x {depth} x {width:<5} {depth + width:>13}  {scores['embedding_cosine']:.4f} / "
              f"{scores['embedding_cosine_min']:.4f}{'':>13}{scores['retrieval_agreement']:>8.1%}"
              f"   ({time.perf_counter() - start:.0f} s)", flush=True)


def parse_job(arg: str) -> tuple[int, int, int]:
    parts = arg.split(":")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise CcliError(f"expected BLOCK:DEPTH:WIDTH with three non-negative integers, got {arg!r}")
    return tuple(int(p) for p in parts)


if __name__ == "__main__":
    try:
        given = [parse_job(arg) for arg in sys.argv[1:]]
        main(given or [(block, depth, width) for block in range(6) for depth, width in SHAPES])
    except CcliError as exc:
        sys.exit(f"error: {exc}")
