"""Mixture of experts cut from a dense FFN's own neurons (MoEfication, D2DMoE, DeepSeekMoE), built
from a dense FFN.

A layer holds E experts of W neurons each, cut from the dense FFN's neurons with their exact dense
weights (a gated FFN's expert holds its neurons' gate, up and down rows), optionally S always-on
*shared* neurons (the dense neurons most used across tokens), a linear router (H -> E) and the dense
output bias. Per token the router predicts how much each expert would add to the output (the norm of
its output vector); the token runs its `top_k` experts by that prediction, or, with `coverage` c > 0
(dynamic k), experts in that order until their predicted contributions reach c of the predicted
total over all experts, at most `top_k` of them. The chosen experts' outputs are added as they are
(no gating scale), so an expert is exactly its dense neurons until training moves it:

    y = b_out + shared(x) + sum over chosen experts e of expert_e(x)

Inference runs the routing (the router is an ordinary linear, counted as such) and then the chosen
experts through the grouped kernel (ccli.kernels.moe: tokens grouped by expert, one pair of matrix
products per expert on its own tokens). Training computes every neuron and masks the experts a
token did not pick (the same function, with gradients reaching only the chosen experts), and the
router learns by regression: its scores are fitted to every expert's actual output norm on the
same tokens (an auxiliary loss the distillation engine adds), so that it keeps predicting what the
experts add as they train.

Conversion from a dense FFN (`MoEVariant.init_from_dense`, on the calibration tokens the engine
passes):
1. how much each dense neuron moves each token's output: |activation| x |output column|;
2. the S neurons with the largest mean contribution become the shared part;
3. the others are split into E groups of at most W = ceil((I - S) / E) neurons: balanced k-means
   of their contribution patterns over the tokens (neurons that fire on the same tokens land
   together; `grouping: cluster`), or in their dense order (`contiguous`); a group with fewer than W
   neurons is padded with silent ones (zero weights), which training may put to use;
4. the router is fitted in closed form (ridge least squares) to each expert's output norm;
5. the distillation engine then trains experts and router against the dense FFN's outputs, layer
   by layer and optionally end to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CcliError
from ..kernels.moe import expert_layout, group_by_expert, moe
from .base import ConvertedModule, DenseFFN, FFNVariant, VariantConfig, apply_activation, option

GROUPINGS = ("cluster", "contiguous")


class MoE(ConvertedModule):
    """E experts of W neurons, top-k routing, optional shared neurons (see module doc)."""

    unit_kind = "ffn"

    def __init__(self, hidden_size: int, experts: int, expert_width: int, top_k: int, shared: int = 0,
                 activation: str = "gelu", gated: bool = False, bias: bool = True, output_bias: bool = True,
                 coverage: float = 0.0):
        super().__init__()
        if experts < 1 or expert_width < 1 or not 1 <= top_k <= experts or shared < 0:
            raise CcliError(f"MoE needs experts >= 1, expert width >= 1, 1 <= top-k <= experts and shared >= 0 "
                            f"(got {experts}, {expert_width}, {top_k}, {shared})")
        self.hidden_size, self.experts, self.expert_width, self.top_k = hidden_size, experts, expert_width, top_k
        self.shared, self.activation, self.gated, self.coverage = shared, activation, gated, coverage
        rows = experts * expert_width
        self.router = nn.Linear(hidden_size, experts)
        self.w_in = nn.Parameter(torch.zeros(rows, hidden_size))
        self.b_in = nn.Parameter(torch.zeros(rows)) if bias else None
        self.w_gate = nn.Parameter(torch.zeros(rows, hidden_size)) if gated else None
        self.w_out = nn.Parameter(torch.zeros(rows, hidden_size))  # row r: neuron r's output vector
        if shared:
            self.shared_in = nn.Linear(hidden_size, shared, bias=bias)
            self.shared_gate = nn.Linear(hidden_size, shared, bias=False) if gated else None
            self.shared_out = nn.Linear(shared, hidden_size, bias=False)
        self.output_bias = nn.Parameter(torch.zeros(hidden_size)) if output_bias else None
        self._aux: torch.Tensor | None = None
        self._kernel_cache: tuple | None = None

    @property
    def total_neurons(self) -> int:
        return self.experts * self.expert_width + self.shared

    @property
    def max_neurons_per_token(self) -> int:
        return self.top_k * self.expert_width + self.shared

    def extra_repr(self) -> str:
        dynamic = f", coverage={self.coverage}" if self.coverage else ""
        return (f"hidden={self.hidden_size}, experts={self.experts} x {self.expert_width}, top_k={self.top_k}{dynamic}, "
                f"shared={self.shared}, activation={self.activation}{', gated' if self.gated else ''}, "
                f"neurons/token<={self.max_neurons_per_token} of {self.total_neurons}")

    # -- routing -------------------------------------------------------------------------------
    def scores(self, x2d: torch.Tensor) -> torch.Tensor:
        """The router's predicted output norm of every expert: (tokens, E)."""
        return nn.functional.linear(x2d, self.router.weight, self.router.bias)

    def choose(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(expert indices (tokens, k), which of them run (tokens, k) bool, or None for all)."""
        if not self.coverage:  # the order of a token's experts does not matter
            return scores.topk(self.top_k, dim=-1, sorted=False).indices, None
        top = scores.topk(self.top_k, dim=-1)
        predicted = top.values.clamp_min(0)
        covered_before = predicted.cumsum(-1) - predicted
        keep = covered_before < self.coverage * scores.clamp_min(0).sum(-1, keepdim=True)
        keep[:, 0] = True
        return top.indices, keep

    def routing_mask(self, x2d: torch.Tensor) -> torch.Tensor:
        """0/1 (tokens, E): the experts each token runs."""
        idx, keep = self.choose(self.scores(x2d))
        mask = x2d.new_zeros(x2d.shape[0], self.experts)
        return mask.scatter_(1, idx, 1.0 if keep is None else keep.to(mask.dtype))

    def expert_load(self, x: torch.Tensor) -> torch.Tensor:
        """Fraction of the tokens of x that run each expert: (E,)."""
        with torch.no_grad():
            return self.routing_mask(x.reshape(-1, self.hidden_size)).mean(0)

    # -- the parts -----------------------------------------------------------------------------
    def _neurons(self, x2d: torch.Tensor) -> torch.Tensor:
        """Every routed neuron's output (tokens, E*W), dense cost: for training and statistics."""
        z = nn.functional.linear(x2d, self.w_in, self.b_in)
        if self.w_gate is None:
            return apply_activation(z, self.activation)
        return apply_activation(nn.functional.linear(x2d, self.w_gate), self.activation) * z

    def _shared_output(self, x2d: torch.Tensor) -> torch.Tensor | None:
        if not self.shared:
            return None
        z = self.shared_in(x2d)
        if self.shared_gate is None:
            h = apply_activation(z, self.activation)
        else:
            h = apply_activation(self.shared_gate(x2d), self.activation) * z
        return self.shared_out(h)

    def expert_norms(self, h: torch.Tensor) -> torch.Tensor:
        """The norm of every expert's output vector per token, from all neuron outputs h (tokens, E*W):
        |h_e W_out_e| = sqrt(h_e G_e h_e) with G_e = W_out_e W_out_e^T (W x W per expert), which costs
        W/H of forming the output vectors themselves."""
        e, w = self.experts, self.expert_width
        w_out = self.w_out.detach().view(e, w, self.hidden_size)
        gram = w_out @ w_out.transpose(1, 2)  # (E, W, W)
        he = h.detach().view(-1, e, w).transpose(0, 1)  # (E, tokens, W)
        squared = (torch.bmm(he, gram) * he).sum(-1).T
        return squared.clamp_min(0).sqrt()

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The router's regression loss from the last training forward pass (then forgotten)."""
        aux, self._aux = self._aux, None
        return aux

    # -- forward -------------------------------------------------------------------------------
    def _training_forward(self, x2d: torch.Tensor) -> torch.Tensor:
        h = self._neurons(x2d)
        # The router learns from its own loss only, on the inputs as given: its regression gradient must
        # not reach the layers before it (end to end, it would pull them toward easier routing).
        scores = self.scores(x2d.detach())
        norms = self.expert_norms(h)
        self._aux = ((scores - norms) ** 2).mean() / (norms**2).mean().clamp_min(1e-12)
        idx, keep = self.choose(scores.detach())
        mask = h.new_zeros(x2d.shape[0], self.experts).scatter_(1, idx, 1.0 if keep is None else keep.to(h.dtype))
        h = (h.view(-1, self.experts, self.expert_width) * mask.unsqueeze(-1)).view_as(h)
        y = h @ self.w_out
        shared = self._shared_output(x2d)
        if shared is not None:
            y = y + shared
        return y if self.output_bias is None else y + self.output_bias

    def _kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(w_in, w_gate) in the kernel's layout, (E, H, W) expert blocks: copies of the parameters,
        cached while they are unchanged (the same tensors, at the same version and address; inference
        tensors have no version counter, so for them only replacements and moves are seen)."""
        params = [p for p in (self.w_in, self.w_gate) if p is not None]
        key = tuple((id(p), -1 if p.is_inference() else p._version, p.data_ptr()) for p in params)
        cache = self._kernel_cache
        if cache is None or cache[0] != key:
            blocks = [expert_layout(p.detach(), self.experts) for p in params]
            cache = self._kernel_cache = (key, blocks[0], blocks[1] if len(blocks) > 1 else None, params)
        return cache[1], cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.hidden_size)
        if self.training and torch.is_grad_enabled():
            return self._training_forward(x2d).view_as(x)
        idx, keep = self.choose(self.scores(x2d))
        tokens, offsets, _ = group_by_expert(idx, self.experts, keep)
        w_in, w_gate = self._kernel_weights()
        y = moe(x2d, tokens, offsets, w_in, self.b_in, self.w_out, self.activation, w_gate, None, self.output_bias)
        shared = self._shared_output(x2d)
        if shared is not None:
            y = y + shared
        return y.view_as(x)

    def neuron_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(computed, positive) neurons per token, from the actual routing (shared neurons included)."""
        with torch.no_grad():
            x2d = x.reshape(-1, self.hidden_size)
            mask = self.routing_mask(x2d)
            computed = (mask.sum(-1) * self.expert_width).long() + self.shared
            if self.w_gate is None:
                z = nn.functional.linear(x2d, self.w_in, self.b_in)
            else:
                z = nn.functional.linear(x2d, self.w_gate)
            positive_routed = apply_activation(z, self.activation) > 0
            positive = (positive_routed.view(-1, self.experts, self.expert_width) & mask.bool().unsqueeze(-1)).sum((1, 2))
            if self.shared:
                zs = self.shared_in(x2d) if self.shared_gate is None else self.shared_gate(x2d)
                positive = positive + (apply_activation(zs, self.activation) > 0).sum(-1)
        return computed, positive


# -- conversion from a dense FFN ------------------------------------------------------------------


def _balanced_assign(similarity: torch.Tensor, capacity: int) -> torch.Tensor:
    """Each row (neuron) to one column (group), most similar pairs first, no group above `capacity`."""
    n, groups = similarity.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    load = [0] * groups
    done = 0
    rows_cols = torch.argsort(similarity.flatten(), descending=True)
    for flat in rows_cols.tolist():
        row, col = divmod(flat, groups)
        if assign[row] < 0 and load[col] < capacity:
            assign[row] = col
            load[col] += 1
            done += 1
            if done == n:
                break
    return assign


def _cluster_neurons(contribution: torch.Tensor, groups: int, capacity: int, seed: int, iters: int = 12) -> torch.Tensor:
    """Balanced k-means (cosine) of the neurons' contribution patterns over the tokens: a group per neuron."""
    patterns = nn.functional.normalize(contribution.t(), dim=1)  # neurons x tokens
    g = torch.Generator().manual_seed(seed)
    centres = patterns[torch.randperm(len(patterns), generator=g)[:groups]]
    assign = torch.zeros(len(patterns), dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(patterns @ centres.T, capacity)
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros(groups, patterns.shape[1]).index_add_(0, assign, patterns)
        centres = nn.functional.normalize(sums, dim=1)
    return assign


def _ridge_fit(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares affine map x (tokens, H) -> target (tokens, E), lightly ridge-regularised:
    (weight (E, H), bias (E,))."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    gram = xb.T @ xb
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    coef = torch.linalg.solve(gram + ridge, xb.T @ target.double())  # (H+1, E)
    return coef[:-1].T.float().contiguous(), coef[-1].float()


@dataclass
class MoEConfig(VariantConfig):
    family = "moe"
    experts: int = option(64, "experts per FFN (the routed dense neurons split evenly among them)", low=1)
    top_k: int = option(14, "experts each token runs (with --coverage, at most this many)", low=1)
    shared: int = option(0, "always-on neurons per FFN (the dense neurons most used across tokens)", low=0)
    coverage: float = option(0.0, "dynamic k: run experts until their predicted contributions reach this fraction "
                             "of the predicted total (0: always top-k)", low=0.0, high=1.0)
    grouping: str = option("cluster", "how the dense neurons are split into experts", choices=GROUPINGS)

    def check(self) -> None:
        if self.top_k > self.experts:
            raise CcliError(f"moe: --top-k {self.top_k} is more than the {self.experts} experts")


class MoEVariant(FFNVariant):
    name = "moe"
    config = MoEConfig

    def check_dense(self, dense: DenseFFN) -> None:
        routed = dense.width - self.params["shared"]
        if routed < self.params["experts"]:
            raise CcliError(f"moe: the FFN has {dense.width} neurons; with --shared {self.params['shared']} there are "
                            f"{max(routed, 0)} left for {self.params['experts']} experts (each needs at least one)")
        if dense.b_gate is not None:
            raise CcliError("moe: gated FFNs with a gate bias are not supported")

    def units(self, arch, block: int):
        units = super().units(arch, block)
        for unit in units:
            dense = unit.teacher
            unit.spec.update(ffn_width=dense.width, bias=dense.b_in is not None,
                             output_bias=dense.b_out is not None)
        return units

    @staticmethod
    def expert_width(ffn_width: int, experts: int, shared: int) -> int:
        return math.ceil((ffn_width - shared) / experts)

    @classmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> MoE:
        width = cls.expert_width(spec["ffn_width"], spec["experts"], spec["shared"])
        return MoE(hidden_size, spec["experts"], width, spec["top_k"], spec["shared"], spec["activation"],
                   spec["gated"], spec["bias"], spec["output_bias"], spec.get("coverage", 0.0))

    def init_from_dense(self, dense: DenseFFN, x: torch.Tensor, seed: int) -> MoE:
        p = self.params
        experts, shared = p["experts"], p["shared"]
        width = self.expert_width(dense.width, experts, shared)
        torch.manual_seed(seed)
        layer = MoE(dense.hidden_size, experts, width, p["top_k"], shared, dense.activation, dense.gated,
                    dense.b_in is not None, dense.b_out is not None, p["coverage"])
        with torch.no_grad():
            contribution = dense.activations(x).abs() * dense.w_out.norm(dim=0)  # (tokens, I)
            order = torch.argsort(contribution.mean(0), descending=True)
            shared_idx, routed = order[:shared].sort().values, order[shared:].sort().values
            if p["grouping"] == "cluster" and experts > 1:
                sample = contribution[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:8192]]
                assign = _cluster_neurons(sample[:, routed], experts, width, seed)
            else:
                assign = torch.arange(len(routed)) // width
            for e in range(experts):
                members = routed[assign == e]
                rows = torch.arange(e * width, e * width + len(members))
                layer.w_in[rows] = dense.w_in[members]
                layer.w_out[rows] = dense.w_out[:, members].T
                if layer.b_in is not None:
                    layer.b_in[rows] = dense.b_in[members]
                if layer.w_gate is not None:
                    layer.w_gate[rows] = dense.w_gate[members]
            if shared:
                layer.shared_in.weight.copy_(dense.w_in[shared_idx])
                if layer.shared_in.bias is not None:
                    layer.shared_in.bias.copy_(dense.b_in[shared_idx])
                if layer.shared_gate is not None:
                    layer.shared_gate.weight.copy_(dense.w_gate[shared_idx])
                layer.shared_out.weight.copy_(dense.w_out[:, shared_idx])
            if layer.output_bias is not None:
                layer.output_bias.copy_(dense.b_out)
            weight, bias = _ridge_fit(x, layer.expert_norms(layer._neurons(x)))
            layer.router.weight.copy_(weight)
            layer.router.bias.copy_(bias)
        return layer
