"""How close can a tree's leaves come to a free choice of neurons per token? (the leaf bound in docs/experiments.md)

    python examples/fff_leaf_bound.py [BLOCK] [DEPTH:WIDTH[:LINEAR] ...]     (defaults: 3 2:380 4:378 6:376)

For one block of the embedded default model, each tree shape (1 tree of depth D, leaves of W
neurons of which LINEAR are linear, default 0) is initialised from the dense FFN as `ccli convert`
does (64k calibration tokens of the training text) and scored untrained on held-out tokens, three
ways against the dense FFN's output:
- the router's leaf (what the converted layer computes);
- each token's best leaf among all 2^D (an oracle router: how much better routing alone could do);
- each token's own top-(D + W) dense neurons, chosen among all of them (the per-token bound that
  examples/fff_selection_bound.py trains end to end).
Prints the relative error (0 is exact) and the mean per-token cosine. A few minutes per shape on 1 thread.
"""

import sys

import torch
from torch import nn

from ccli.arch import view
from ccli.data import load_paragraphs, training_text
from ccli.capture import collect_inputs
from ccli.distill import tokenize
from ccli.measure.fidelity import relative_error
from ccli.hub import load
from ccli.kernels.fff import leaf_activations
from ccli.variants.base import DenseFFN, apply_activation
from ccli.variants.fff import FFF, FFFVariant


def token_cosine(pred: torch.Tensor, target: torch.Tensor) -> float:
    return nn.functional.cosine_similarity(pred, target).mean().item()


def best_leaf_output(layer: FFF, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each token's output through whichever leaf of the (single) tree fits `target` best. Node
    neurons start with zero output, so a path's output is its leaf's output."""
    internal, leaves, w = 2**layer.depth - 1, 2**layer.depth, layer.leaf_width
    z = nn.functional.linear(x, layer.linear_in.weight[internal:], layer.linear_in.bias[internal:])
    act = leaf_activations(z.view(len(x), leaves, w), lambda v: apply_activation(v, layer.activation), layer.leaf_linear)
    w_out = layer.linear_out.weight[:, internal:].t().reshape(leaves, w, -1)
    best, best_error = target.clone(), torch.full((len(x),), float("inf"))
    for j in range(leaves):
        out = act[:, j] @ w_out[j] + layer.output_bias
        error = (out - target).pow(2).sum(-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best[better] = out[better]
    return best


def top_k_output(dense: DenseFFN, x: torch.Tensor, k: int) -> torch.Tensor:
    act = dense.activations(x)
    contribution = act.abs() * dense.w_out.norm(dim=0)
    keep = torch.zeros_like(act).scatter_(-1, contribution.topk(k, dim=-1).indices, 1.0)
    return (act * keep) @ dense.w_out.t() + dense.b_out


def main(block: int, shapes: list[tuple[int, int]]) -> None:
    torch.set_num_threads(1)
    loaded = load("minilm")
    ffn = view(loaded.model).blocks[block].ffn
    train = tokenize(loaded.tokenizer, training_text(None, 0.5, 0), 128)
    heldout = tokenize(loaded.tokenizer, load_paragraphs(None, "heldout")[:256], 128)
    x = collect_inputs(loaded.model, ffn.paths[0], train, 65536)
    x_heldout = collect_inputs(loaded.model, ffn.paths[0], heldout, 8192)
    dense = DenseFFN.from_view(ffn)
    print(f"block {block}, {len(x)} calibration tokens, {len(x_heldout)} held-out tokens; relative error / token cosine")
    with torch.no_grad():
        target = dense(x_heldout)
    for depth, width, linear in shapes:
        layer = FFFVariant(1, depth, width, linear).init_from_dense(dense, x, seed=0).eval()  # fits routers: needs grad
        with torch.no_grad():
            rows = {"router's leaf": layer(x_heldout), "best leaf": best_leaf_output(layer, x_heldout, target),
                    f"own top-{depth + width}": top_k_output(dense, x_heldout, depth + width)}
        cells = "   ".join(f"{name} {relative_error(p, target):.4f} / {token_cosine(p, target):.4f}" for name, p in rows.items())
        print(f"1 x {depth} x {width}{f' ({linear} linear)' if linear else ''}: {cells}", flush=True)


if __name__ == "__main__":
    args = sys.argv[1:]
    shapes = [tuple(int(v) for v in a.split(":")) for a in args[1:]] or [(2, 380), (4, 378), (6, 376)]
    main(int(args[0]) if args else 3, [(*shape, 0)[:3] for shape in shapes])
