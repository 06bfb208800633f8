"""How much of a decoder's FFN can ANY per-token choice of neurons drop? (docs/decoders.md)

    python examples/lm_topk_bound.py [MODEL] [FRACTIONS] [PARAGRAPHS] [EXPERTS]
    (defaults: smollm2 0.75,0.5,0.25 16 0; ~10 min on 2 threads for SmolLM2)

Every FFN keeps, for each token, its own dense neurons that move the output most (|neuron output| x
|output column|, where a gated neuron's output is act(gate) * up), the given fraction of them, chosen
among all neurons on every forward pass; the rest are dropped. No training. The model is scored like
a conversion: perplexity, KL(original || this) and next-token top-1 agreement on the held-out
paragraphs of every bundled domain, pooled. Choosing the neurons needs every pre-activation, so this
is no speedup: it is the fidelity a perfect router keeping exact dense neurons would start from, the
bound FFF leaves and MoE experts (fixed subsets of neurons, chosen by a cheap router) work under.

With EXPERTS E > 0 the choice is of whole experts instead: the neurons are cut into E groups in their
dense order (as `ccli convert --to moe --grouping contiguous`) and each token keeps the fraction of
groups whose output vectors are longest: the bound of an MoE whose router never errs.
"""

import copy
import sys

import torch
from torch import nn

from ccli.arch import view
from ccli.data import evaluation_sets
from ccli.hub import load
from ccli.measure.fidelity import compare
from ccli.variants.base import ConvertedModule, DenseFFN


class TopKFFN(ConvertedModule):
    """A dense FFN (gated or not) that keeps only each token's top-k contributing neurons."""

    unit_kind = "ffn"

    def __init__(self, dense: DenseFFN, k: int, experts: int = 0):
        super().__init__()
        self.dense, self.k, self.experts = dense, k, experts
        self.out_norm = dense.w_out.norm(dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.dense.activations(x)
        if self.experts:  # k whole experts: the longest expert outputs
            groups = a.view(*a.shape[:-1], self.experts, -1)
            w_out = self.dense.w_out.T.reshape(self.experts, groups.shape[-1], -1)
            norms = torch.einsum("...ew,ewh->...eh", groups, w_out).norm(dim=-1)
            keep = torch.zeros_like(norms).scatter_(-1, norms.topk(self.k, dim=-1).indices, 1.0)
            keep = keep.unsqueeze(-1).expand_as(groups).reshape_as(a)
        else:
            keep = torch.zeros_like(a).scatter_(-1, (a.abs() * self.out_norm).topk(self.k, dim=-1).indices, 1.0)
        return nn.functional.linear(a * keep, self.dense.w_out, self.dense.b_out)


def main(model: str = "smollm2", fractions: str = "0.75,0.5,0.25", paragraphs: int = 16, experts: int = 0) -> None:
    teacher = load(model)
    texts = [p for s in evaluation_sets(None, per_domain=paragraphs) for p in s.paragraphs]
    keys = ("perplexity_teacher", "perplexity_student", "kl", "top1_agreement", "lm_tokens")
    for fraction in (float(f) for f in fractions.split(",")):
        student = copy.deepcopy(teacher.model)
        for block in view(student).blocks:
            dense = DenseFFN.from_view(block.ffn)
            units = experts or dense.width
            block.ffn.replace(TopKFFN(dense, max(1, round(fraction * units)), experts))
        fidelity = compare(student.eval(), teacher.model, teacher.tokenizer, texts)
        what = f"of {experts} experts" if experts else "of neurons"
        print(f"top {fraction:.0%} {what} per token:", {key: fidelity.get(key) for key in keys}, flush=True)


if __name__ == "__main__":
    main(*(cast(arg) for cast, arg in zip((str, str, int, int), sys.argv[1:5])))
