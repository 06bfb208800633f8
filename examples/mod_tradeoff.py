"""The Mixture-of-Depths trade-off on the embedded default model (the tables in docs/mod.md).

    python examples/mod_tradeoff.py CAPACITY:BLOCKS:ATTENTION:STEPS:E2E_STEPS[:TRAIN] ...
        e.g. 0.5:alternate:all:0:0  0.5:1,2,3,4:all:100:300:both

Each job converts all-MiniLM-L6-v2 with `ccli.convert` (`--to mod`; STEPS layer-wise steps on 8192
calibration tokens per routed block, E2E_STEPS end-to-end steps with --e2e-target all; TRAIN is
--train, block by default; STEPS 0 and E2E_STEPS 0 keep the routers as initialised from the blocks'
update norms and the blocks as they were), scores it on the first 256 bundled held-out paragraphs (pooled-embedding cosine
mean / worst, retrieval agreement), counts its FLOPs per token at batch 1, seq 128 from the executed
graph (`ccli profile`), and times it beside the dense model (`ccli bench`, batch 1, seq 128, one
thread, 1 s per row). One JSON line per job on stdout.
"""

import json
import sys
import tempfile
import time

import torch

from ccli.api import bench, profile
from ccli.conversion import convert


def run(job: str) -> dict:
    parts = job.split(":")
    capacity, blocks, attention, steps, e2e = float(parts[0]), parts[1], parts[2], int(parts[3]), int(parts[4])
    train = parts[5] if len(parts) > 5 else "block"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/mod"
        record = convert("minilm", to="mod", params={"capacity": capacity, "blocks": blocks, "attention": attention,
                                                     "train": train},
                         steps=steps, e2e_steps=e2e, e2e_target="all", tokens=8192, out=out, show_progress=False)
        (row,) = profile(out, seq=128, cross_check=False)
        (dense,) = profile("minilm", seq=128, cross_check=False)
        times = bench(out, seq=128, batch=1, threads=1, min_run_time=1.0, with_baselines=False)
    fid = record["fidelity"]
    return {
        "job": job, "capacity": capacity, "blocks": blocks, "attention": attention, "steps": steps, "e2e_steps": e2e,
        "train": train, "routed": [b["block"] for b in row["routed_blocks"]],
        "flops_per_token": row["flops_per_token"], "flops_per_token_dense": dense["flops_per_token"],
        "flops_saved": round(1 - row["flops_per_token"] / dense["flops_per_token"], 4),
        "cosine": round(fid["embedding_cosine"], 4), "cosine_worst": round(fid["embedding_cosine_min"], 4),
        "retrieval_agreement": round(fid["retrieval_agreement"], 4),
        "layers": [(r["layer"], round(r["init_rel_error"], 4), round(r["final_rel_error"], 4)) for r in record["layers"]],
        "e2e_kept": record["e2e_kept"],
        "ms_dense": times[0]["median_ms"], "ms": times[1]["median_ms"], "seconds": round(time.perf_counter() - start),
    }


if __name__ == "__main__":
    torch.set_num_threads(1)
    for job in sys.argv[1:]:
        print(json.dumps(run(job)), flush=True)
