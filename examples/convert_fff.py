"""Convert the embedded default model into fast feedforward trees, save it, reload it and compare.

    python examples/convert_fff.py [--quick]

--quick uses a tiny training budget (about a minute on 2 cores) to show the workflow; without it the
recommended recipe runs (recipes/fff-minilm.yaml: measured at 52 minutes on one thread of a shared
2-core VM, see docs/fff.md).
"""

import sys

import torch

import ccli

quick = "--quick" in sys.argv
options = dict(steps=30, e2e_steps=0, tokens=4096) if quick else {}
record = ccli.convert(recipe="recipes/fff-minilm.yaml", out="minilm-fff", overwrite=True, **options)

fidelity = record["fidelity"]
print(f"FFN FLOPs per token: {record['ffn_flops_per_token_dense']:,} -> {record['ffn_flops_per_token']:,} "
      f"({record['ffn_flops_reduction']}x fewer)")
print(f"held-out pooled-embedding cosine {fidelity['embedding_cosine']:.3f}, "
      f"retrieval agreement {fidelity['retrieval_agreement']:.1%}")

# The saved directory is a complete model: the FFF kernels run inside its own forward pass.
model, tokenizer = ccli.load("minilm-fff")
batch = tokenizer(["Conditional computation skips the neurons a token does not need."], return_tensors="pt")
with torch.inference_mode():
    embedding = model(**batch).last_hidden_state.mean(1)
print("embedding shape", tuple(embedding.shape))

for row in ccli.bench("minilm-fff", device="cpu", seq=128, min_run_time=1.0):
    print(f"{row['variant']:>40}: {row['median_ms']:.2f} ms, {row['speedup']:.2f}x the dense model")
