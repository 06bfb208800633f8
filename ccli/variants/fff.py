"""Fast feedforward trees (UltraFastBERT, Belcak & Wattenhofer 2023), built from a dense FFN.

A layer holds K trees of depth D. Each internal node is one neuron (input row, activation, output
row) whose pre-activation sign routes the token to child 2n+1 (negative) or 2n+2 (zero or positive);
every node on the path adds its output. A leaf holds W neurons (W = 1 is exactly UltraFastBERT:
depth 11 visits 12 of 4095 neurons). The last R of them (`leaf_linear`, default 0) may be linear
neurons (no activation): together a rank-R linear map of the leaf's own, which stands in for what
the dense neurons the leaf leaves out add on the tokens that reach it, at the cost of R neurons.
The trees' outputs are summed, plus the dense FFN's output bias.

Gated FFNs (LLaMA family: neurons act(gate.x) * up.x) give gated trees: every neuron, node or leaf,
is a gate/up pair under one output row, and a node routes by the sign of its gate pre-activation.
`linear_up` (K*M, H), without bias, holds the up rows; leaves start from the dense neurons' gate, up
and down rows; node neurons get a random up row and a zero output row (no linear leaf neurons).

Weights keep UltraFastBERT's layout: `linear_in` (K*M, H) with bias and `linear_out` (H, K*M)
without bias, where M = 2^D - 1 + 2^D * W and node n of tree k is row k*M + n, so a published
UltraFastBERT layer loads unchanged (`FFF.from_ultrafastbert`).

Inference always runs hard routing through the CMM kernel (ccli.kernels.fff). Training uses the
same hard routes, so gradients reach exactly the neurons a token uses: with wide leaves it computes,
tree by tree, the nodes densely and each leaf's block only on the tokens that reach it (training
costs what the routes visit, not every neuron the tree holds); with narrow leaves (UltraFastBERT's
1-neuron leaves, thousands of them) it masks a dense computation instead.

Conversion from a dense FFN (`FFFVariant.init_from_dense`), in the spirit of MoEfication:
1. with several trees, the dense neurons are split into one group per tree by co-activation;
2. each tree is grown from the tokens down: a node splits the tokens reaching it into balanced
   halves of similar activation patterns and fits a logistic router to that split (tokens then
   follow the fitted router, so each router learns what it will see at inference); node neurons
   start with zero output;
3. each leaf keeps, with their exact dense weights, the W - R neurons that matter most to the tokens
   arriving there (leaves may share neurons);
4. with R > 0, each leaf's linear neurons are fitted in closed form (reduced-rank least squares) to
   what the tree still misses on the tokens arriving there;
5. the distillation engine then trains everything against the dense FFN's outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CcliError
from ..kernels.fff import MAX_DEPTH, MAX_LEAVES, fff, leaf_activations
from .base import ConvertedModule, DenseFFN, FFNVariant, VariantConfig, apply_activation, option


def neurons_per_tree(depth: int, leaf_width: int) -> int:
    return 2**depth - 1 + 2**depth * leaf_width


# Leaves at least this wide train leaf by leaf (one small matmul per leaf); narrower ones, where a
# Python loop over many tiny leaves would cost more than the neurons it skips, train masked.
LEAF_BY_LEAF_MIN_WIDTH = 8


def walk(z_nodes: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk trees from the root by the sign of the node pre-activations z_nodes (..., 2^D - 1):
    returns the 0/1 mask of the nodes visited (same shape) and the leaf reached (...), in 0..2^D-1."""
    path = torch.zeros_like(z_nodes)
    node = torch.zeros(*z_nodes.shape[:-1], 1, dtype=torch.long, device=z_nodes.device)
    for _ in range(depth):
        path.scatter_(-1, node, 1.0)
        node = 2 * node + 1 + (z_nodes.gather(-1, node) >= 0).long()
    return path, node.squeeze(-1) - (2**depth - 1)


class FFF(ConvertedModule):
    """K fast feedforward trees of depth D with leaves of W neurons (see module doc)."""

    unit_kind = "ffn"

    def __init__(self, hidden_size: int, trees: int = 1, depth: int = 11, leaf_width: int = 1,
                 activation: str = "gelu", output_bias: bool = True, leaf_linear: int = 0, gated: bool = False):
        super().__init__()
        if trees < 1 or depth < 0 or leaf_width < 1:
            raise CcliError(f"FFF needs trees >= 1, depth >= 0 and leaf width >= 1 (got {trees}, {depth}, {leaf_width})")
        _check_size(trees, depth)
        if not 0 <= leaf_linear <= leaf_width:
            raise CcliError(f"FFF leaf-linear must be from 0 to the leaf width {leaf_width} (got {leaf_linear})")
        if gated and leaf_linear:
            raise CcliError("fff: gated trees have no linear leaf neurons (--leaf-linear is for ungated FFNs)")
        self.gated = gated
        self.hidden_size, self.trees, self.depth, self.leaf_width = hidden_size, trees, depth, leaf_width
        self.leaf_linear = leaf_linear
        self.activation = activation
        self.per_tree = neurons_per_tree(depth, leaf_width)
        self.linear_in = nn.Linear(hidden_size, trees * self.per_tree, bias=True)
        self.linear_out = nn.Linear(trees * self.per_tree, hidden_size, bias=False)
        self.linear_up = nn.Linear(hidden_size, trees * self.per_tree, bias=False) if gated else None
        self.output_bias = nn.Parameter(torch.zeros(hidden_size)) if output_bias else None
        self._kernel_cache: tuple | None = None

    @property
    def neurons_per_token(self) -> int:
        """Neurons computed per token: one path per tree."""
        return self.trees * (self.depth + self.leaf_width)

    @property
    def total_neurons(self) -> int:
        return self.trees * self.per_tree

    def extra_repr(self) -> str:
        linear = f" ({self.leaf_linear} linear)" if self.leaf_linear else ""
        return (f"hidden={self.hidden_size}, trees={self.trees}, depth={self.depth}, leaf_width={self.leaf_width}{linear}, "
                f"activation={self.activation}{', gated' if self.gated else ''}, neurons/token={self.neurons_per_token} of {self.total_neurons}")

    @classmethod
    def from_ultrafastbert(cls, linear_in_weight, linear_in_bias, linear_out_weight, *, trees: int, depth: int,
                           activation: str = "gelu") -> FFF:
        """A layer holding an UltraFastBERT FFF's weights, unchanged (its depth D = 2^(D+1)-1 nodes per tree)."""
        layer = cls(linear_in_weight.shape[1], trees, depth, 1, activation, output_bias=False)
        layer.load_state_dict({"linear_in.weight": linear_in_weight, "linear_in.bias": linear_in_bias,
                               "linear_out.weight": linear_out_weight})
        return layer

    # -- routing -------------------------------------------------------------------------------
    def route_mask(self, z: torch.Tensor) -> torch.Tensor:
        """0/1 mask (tokens, K*M) of the neurons each token visits, from pre-activations z (tokens, K*M)."""
        tokens = z.shape[0]
        k, m, w, internal = self.trees, self.per_tree, self.leaf_width, 2**self.depth - 1
        zt = z.detach().view(tokens, k, m)
        path, leaf = walk(zt[..., :internal], self.depth)
        mask = torch.zeros_like(zt)
        mask[..., :internal] = path
        mask.scatter_(2, internal + leaf.unsqueeze(2) * w + torch.arange(w, device=z.device), 1.0)
        return mask.view(tokens, k * m)

    def activations(self, z: torch.Tensor) -> torch.Tensor:
        """The neurons' outputs from their pre-activations z (tokens, K*M): act(z), or z for linear neurons."""
        if not self.leaf_linear:
            return apply_activation(z, self.activation)
        internal, w = 2**self.depth - 1, self.leaf_width
        rows = z.view(len(z), self.trees, self.per_tree)
        leaves = leaf_activations(rows[..., internal:].reshape(len(z), self.trees, -1, w),
                                  lambda v: apply_activation(v, self.activation), self.leaf_linear)
        nodes = apply_activation(rows[..., :internal], self.activation)
        return torch.cat([nodes, leaves.flatten(2)], -1).view_as(z)

    def routed_activations(self, x2d: torch.Tensor) -> torch.Tensor:
        """Neuron outputs on the visited neurons, 0 elsewhere: (tokens, K*M). Dense cost; for training and stats."""
        z = self.linear_in(x2d)
        h = self.activations(z)
        if self.gated:
            h = h * self.linear_up(x2d)
        return h * self.route_mask(z)

    def neuron_counts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(computed, positive) neurons per token, measured from the actual routing."""
        with torch.no_grad():
            x2d = x.reshape(-1, self.hidden_size)
            z = self.linear_in(x2d)
            mask = self.route_mask(z).bool()
            positive = ((self.activations(z) > 0) & mask).sum(-1)
            computed = mask.sum(-1)
        return computed, positive

    # -- forward -------------------------------------------------------------------------------
    def _kernel_weights(self) -> tuple:
        """(w_in, b_in, w_out, b_out) in the kernel's layout. Only w_out differs from the parameters
        (linear_out's weight as contiguous rows (K*M, H)); w_up, the up rows of gated trees (or None), is
        linear_up's weight as it is. The copy of w_out is cached while the weight is
        unchanged: the same object (the cache holds it, so its id stays its own), at the same version
        and address. It reads the parameter dicts directly and checks one tensor because on one token
        nn.Module attribute lookups and version checks cost as much as the kernel. Inference tensors
        (a model built under torch.inference_mode()) have no version counter; for them only
        replacements and moves are seen, as they cannot change outside inference mode."""
        linear_in = self._modules["linear_in"]._parameters
        w_out = self._modules["linear_out"]._parameters["weight"]
        w_up = self._modules["linear_up"]._parameters["weight"] if self.gated else None
        key = (id(w_out), -1 if w_out.is_inference() else w_out._version, w_out.data_ptr())
        cache = self._kernel_cache
        if cache is None or cache[0] != key:
            cache = self._kernel_cache = (key, w_out.detach().t().contiguous(), w_out)
        return linear_in["weight"], linear_in["bias"], cache[1], self._parameters.get("output_bias"), w_up

    def _masked_training_output(self, x2d: torch.Tensor) -> torch.Tensor:
        """Every neuron computed, the unvisited ones masked out: (tokens, H), without output bias."""
        return self.linear_out(self.routed_activations(x2d))

    def _leaf_by_leaf_training_output(self, x2d: torch.Tensor) -> torch.Tensor:
        """The same function as `_masked_training_output`, computing only what the routes visit:
        per tree, the 2^D - 1 node neurons densely, then each leaf's W neurons on its own tokens."""
        tokens, leaves = x2d.shape[0], 2**self.depth
        internal = leaves - 1
        # unbind, not indexing: its backward writes each gradient once, where a slice per leaf would
        # add a zero-filled gradient of the whole weight per leaf
        w_in = self.linear_in.weight.view(self.trees, self.per_tree, -1).unbind(0)
        b_in = self.linear_in.bias.view(self.trees, self.per_tree).unbind(0)
        w_out = self.linear_out.weight.view(-1, self.trees, self.per_tree).unbind(1)
        w_up = self.linear_up.weight.view(self.trees, self.per_tree, -1).unbind(0) if self.gated else None
        y = x2d.new_zeros(tokens, self.hidden_size)
        for k in range(self.trees):
            z = nn.functional.linear(x2d, w_in[k][:internal], b_in[k][:internal])
            path, leaf = walk(z.detach(), self.depth)
            if internal:
                h = apply_activation(z, self.activation)
                if self.gated:
                    h = h * nn.functional.linear(x2d, w_up[k][:internal])
                y = y + nn.functional.linear(h * path, w_out[k][:, :internal])
            leaf_w_in = w_in[k][internal:].view(leaves, self.leaf_width, -1).unbind(0)
            leaf_b_in = b_in[k][internal:].view(leaves, self.leaf_width).unbind(0)
            leaf_w_out = w_out[k][:, internal:].reshape(-1, leaves, self.leaf_width).unbind(1)
            leaf_w_up = w_up[k][internal:].view(leaves, self.leaf_width, -1).unbind(0) if self.gated else None
            counts = torch.bincount(leaf, minlength=leaves).tolist()
            for j, members in enumerate(torch.split(torch.argsort(leaf), counts)):
                if counts[j]:
                    z_leaf = nn.functional.linear(x2d[members], leaf_w_in[j], leaf_b_in[j])
                    h = leaf_activations(z_leaf, lambda v: apply_activation(v, self.activation), self.leaf_linear)
                    if self.gated:
                        h = h * nn.functional.linear(x2d[members], leaf_w_up[j])
                    y = y.index_add(0, members, nn.functional.linear(h, leaf_w_out[j]))
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            x2d = x.reshape(-1, self.hidden_size)
            if self.leaf_width >= LEAF_BY_LEAF_MIN_WIDTH:
                y = self._leaf_by_leaf_training_output(x2d).view_as(x)
            else:
                y = self._masked_training_output(x2d).view_as(x)
            return y if self.output_bias is None else y + self.output_bias
        w_in, b_in, w_out, b_out, w_up = self._kernel_weights()
        return fff(x, w_in, b_in, w_out, self.trees, self.depth, self.leaf_width, self.activation, b_out, self.leaf_linear,
                   w_up)


# -- conversion from a dense FFN ------------------------------------------------------------------


def _principal_split(patterns: torch.Tensor) -> torch.Tensor:
    """Balanced 0/1 labels for rows of `patterns`: which side of the median they fall along the
    principal direction (rows that look alike land together)."""
    if patterns.shape[0] < 4:
        return (torch.arange(patterns.shape[0]) % 2).float()
    centred = patterns - patterns.mean(0, keepdim=True)
    try:
        _, _, v = torch.svd_lowrank(centred, q=2, niter=4)  # only the principal direction is needed
        score = centred @ v[:, 0]
    except RuntimeError:  # degenerate patterns
        score = torch.arange(patterns.shape[0], dtype=patterns.dtype)
    return (score > score.median()).float()


def _fit_level(xs: torch.Tensor, node: torch.Tensor, labels: torch.Tensor, nodes: int, steps: int, lr: float):
    """Logistic regression for every node of one level at once; token t trains only its node[t]."""
    w = torch.zeros(nodes, xs.shape[1], requires_grad=True)
    b = torch.zeros(nodes, requires_grad=True)
    optimizer = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        logits = (xs * w[node]).sum(-1) + b[node]
        loss = nn.functional.binary_cross_entropy_with_logits(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    w, b = w.detach(), b.detach()
    return w, b, ((xs * w[node]).sum(-1) + b[node] >= 0).long()


def _grow_tree(x: torch.Tensor, contribution: torch.Tensor, depth: int, leaf_width: int,
               steps: int = 100, lr: float = 0.1):
    """Grow one tree from the tokens down.

    Each node splits the tokens that reach it into two balanced halves along the principal direction
    of their activation-contribution patterns (tokens that use the same neurons stay together) and
    fits a logistic router to that split; tokens then follow the router's own hard decisions, so each
    router learns the distribution it will see at inference. Each leaf keeps the `leaf_width` dense
    neurons that contribute most, on average, to the tokens that arrive there (leaves may share
    neurons). Returns (router weights (2^D - 1, H), biases (2^D - 1), leaf neurons (2^D, W))."""
    tokens, hidden = x.shape
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    patterns = nn.functional.normalize(contribution, dim=1)
    node = torch.zeros(tokens, dtype=torch.long)
    weights, biases = [], []
    for level in range(depth):
        labels = torch.zeros(tokens)
        for n in range(2**level):
            members = (node == n).nonzero().squeeze(1)
            if members.numel():
                labels[members] = _principal_split(patterns[members])
        w, b, go_right = _fit_level(xs, node, labels, 2**level, steps, lr)
        weights.append(w)
        biases.append(b)
        node = 2 * node + go_right
    overall = contribution.mean(0)
    leaves = torch.empty(2**depth, leaf_width, dtype=torch.long)
    for j in range(2**depth):
        members = node == j
        importance = contribution[members].mean(0) if members.sum() >= 8 else overall
        leaves[j] = torch.topk(importance, min(leaf_width, importance.numel())).indices.repeat(
            (leaf_width + importance.numel() - 1) // importance.numel())[:leaf_width]
    if depth == 0:
        return torch.zeros(0, hidden), torch.zeros(0), leaves
    w = torch.cat(weights)
    b = torch.cat(biases)
    # undo the standardisation: w.(x - mean)/std + b = (w/std).x + (b - w.(mean/std))
    return w / std, b - (w * (mean / std)).sum(-1), leaves


def _neuron_groups(contribution: torch.Tensor, trees: int) -> list[torch.Tensor]:
    """Split the dense neurons into `trees` groups of neurons that fire on the same tokens, one per tree."""
    if trees == 1:
        return [torch.arange(contribution.shape[1])]
    patterns = nn.functional.normalize(contribution.t(), dim=1)  # neurons x tokens
    centred = patterns - patterns.mean(0, keepdim=True)
    _, _, v = torch.svd_lowrank(centred, q=2, niter=4)
    order = torch.argsort(centred @ v[:, 0])
    return list(torch.tensor_split(order, trees))


def _reduced_rank_fit(x: torch.Tensor, target: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best rank-`rank` affine map from x (tokens, H) to target (tokens, H) in least squares
    (ridge-regularised full fit, projected onto the top principal directions of its fitted values),
    as `rank` linear neurons: input rows (rank, H), biases (rank,), output vectors (rank, H)."""
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1).double()
    gram = xb.T @ xb
    ridge = 1e-4 * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    coef = torch.linalg.solve(gram + ridge, xb.T @ target.double())  # (H+1, H)
    _, _, v = torch.linalg.svd(xb @ coef, full_matrices=False)
    out = v[:rank]  # (rank, H) orthonormal output directions
    if len(out) < rank:  # more neurons than directions: the rest start silent
        out = torch.cat([out, out.new_zeros(rank - len(out), out.shape[1])])
    inp = coef @ out.T  # (H+1, rank): z = [x, 1] . inp, y = z . out
    # balance the two sides (same norm per neuron) so that gradient steps move both alike
    scale = (inp.norm(dim=0) / out.norm(dim=1).clamp_min(1e-12)).clamp_min(1e-12).sqrt()
    inp, out = inp / scale, out * scale.unsqueeze(1)
    return inp[:-1].T.float(), inp[-1].float(), out.float()


def _fit_leaf_linear(layer: FFF, dense: DenseFFN, x: torch.Tensor) -> None:
    """Fit every leaf's linear neurons (the last `leaf_linear` of it) to what the layer still misses,
    tree after tree, on the tokens of `x` that reach the leaf. A leaf that too few tokens reach to
    fit an affine map is fitted on all tokens instead."""
    k_trees, depth, w, rank = layer.trees, layer.depth, layer.leaf_width, layer.leaf_linear
    internal, hidden = 2**depth - 1, layer.hidden_size
    w_in = layer.linear_in.weight.data.view(k_trees, layer.per_tree, -1)
    b_in = layer.linear_in.bias.data.view(k_trees, layer.per_tree)
    w_out = layer.linear_out.weight.data.view(-1, k_trees, layer.per_tree)
    linear_rows = internal + (torch.arange(2**depth).unsqueeze(1) * w + torch.arange(w - rank, w)).reshape(-1)
    w_out[:, :, linear_rows] = 0.0  # silent while the rest of the layer is measured
    with torch.no_grad():
        missing = dense(x) - layer.eval()(x)
        z_nodes = nn.functional.linear(x, w_in[:, :internal].reshape(-1, hidden), b_in[:, :internal].reshape(-1))
        _, leaf = walk(z_nodes.view(len(x), k_trees, internal), depth)  # (tokens, K)
        for k in range(k_trees):
            fitted = torch.zeros_like(missing)
            everyone = None  # this tree's fit on all tokens, made when a leaf needs it
            for j in range(2**depth):
                members = leaf[:, k] == j
                rows = internal + j * w + torch.arange(w - rank, w)
                if members.sum() >= 2 * hidden:
                    fit = _reduced_rank_fit(x[members], missing[members], rank)
                else:
                    fit = everyone = everyone or _reduced_rank_fit(x, missing, rank)
                w_in[k, rows], b_in[k, rows], w_out[:, k, rows] = fit[0], fit[1], fit[2].T
                fitted[members] = (x[members] @ fit[0].T + fit[1]) @ fit[2]
            missing -= fitted
    layer._kernel_cache = None  # the weights changed through .data, which the kernel's cache cannot see


def _check_size(trees: int, depth: int) -> None:
    """The one depth cap, and a cap on the leaves of a layer, past which growing the trees runs out of memory."""
    if depth > MAX_DEPTH:
        raise CcliError(f"fff: depth {depth} is too deep (2^{depth} leaves); use depth <= {MAX_DEPTH}")
    if trees * 2**depth > MAX_LEAVES:
        raise CcliError(f"fff: trees x 2^depth = {trees} x 2^{depth} = {trees * 2**depth} leaves per layer, more than "
                        f"the limit of {MAX_LEAVES} (memory); use fewer trees or a smaller depth")


@dataclass
class FFFConfig(VariantConfig):
    family = "fff"
    trees: int = option(1, "parallel trees per layer", low=1)
    depth: int = option(3, "tree depth (routing decisions per token)", low=0, high=MAX_DEPTH)
    leaf_width: int = option(1, "neurons per leaf (1 = UltraFastBERT)", low=1)
    leaf_linear: int = option(0, "how many of each leaf's neurons are linear (no activation)", low=0)

    def check(self) -> None:
        _check_size(self.trees, self.depth)
        if self.leaf_linear > self.leaf_width:
            raise CcliError(f"fff: leaf-linear {self.leaf_linear} is more than the leaf width {self.leaf_width} (the "
                            "linear neurons are part of each leaf)")


class FFFVariant(FFNVariant):
    name = "fff"
    config = FFFConfig

    def check_dense(self, dense: DenseFFN) -> None:
        if dense.gated and dense.b_in is not None:
            raise CcliError("fff: gated FFNs whose up projection has a bias are not supported")
        if dense.gated and self.params["leaf_linear"]:
            raise CcliError("fff: --leaf-linear is for ungated FFNs (gated trees have no linear leaf neurons)")
        trees = self.params["trees"]
        if trees > dense.width:  # each tree starts from its own group of the dense neurons
            raise CcliError(f"fff: {trees} trees for an FFN of {dense.width} neurons; each tree needs at least one, "
                            f"use --trees <= {dense.width}")

    @classmethod
    def skeleton(cls, hidden_size: int, spec: dict) -> FFF:
        return FFF(hidden_size, spec["trees"], spec["depth"], spec["leaf_width"], spec["activation"],
                   leaf_linear=spec.get("leaf_linear", 0), gated=spec.get("gated", False))

    def init_from_dense(self, dense: DenseFFN, x: torch.Tensor, seed: int) -> FFF:
        trees, depth, leaf_width = self.params["trees"], self.params["depth"], self.params["leaf_width"]
        linear = self.params["leaf_linear"]
        activated = leaf_width - linear  # leaf neurons that take the activation
        torch.manual_seed(seed)
        layer = FFF(dense.hidden_size, trees, depth, leaf_width, dense.activation, leaf_linear=linear, gated=dense.gated)
        with torch.no_grad():
            # how much each dense neuron moves each token's output: |activation| x |output column|
            contribution = dense.activations(x).abs() * dense.w_out.norm(dim=0)
        internal = 2**depth - 1
        w_in = layer.linear_in.weight.data.view(trees, layer.per_tree, -1)
        b_in = layer.linear_in.bias.data.view(trees, layer.per_tree)
        w_out = layer.linear_out.weight.data.view(-1, trees, layer.per_tree)
        # the activated rows: a gated FFN's gate rows (its w_in, without bias, is the up projection)
        act_w, act_b = (dense.w_gate, dense.b_gate) if dense.gated else (dense.w_in, dense.b_in)
        if dense.gated:
            w_up = layer.linear_up.weight.data.view(trees, layer.per_tree, -1)
            # node neurons: a random up row as long as a typical dense one (their output rows start at
            # zero, so they add nothing until distillation trains them, and a zero up row never would)
            w_up.copy_(nn.functional.normalize(torch.randn_like(w_up), dim=-1) * dense.w_in.norm(dim=1).median())
        leaf_rows = torch.arange(2**depth * leaf_width).view(2**depth, leaf_width)
        activated_rows = internal + leaf_rows[:, :activated].reshape(-1)
        for k, group in enumerate(_neuron_groups(contribution, trees)):
            router_w, router_b, leaves = _grow_tree(x, contribution[:, group], depth, max(activated, 1))
            chosen = group[leaves[:, :activated].reshape(-1)]  # dense neuron for every activated leaf slot of this tree
            w_in[k, :internal] = router_w
            b_in[k, :internal] = router_b
            w_out[:, k, :internal] = 0.0  # node neurons start silent; distillation gives them a voice
            w_in[k, activated_rows] = act_w[chosen]
            b_in[k, activated_rows] = act_b[chosen] if act_b is not None else 0.0
            w_out[:, k, activated_rows] = dense.w_out[:, chosen]
            if dense.gated:
                w_up[k, activated_rows] = dense.w_in[chosen]
        if layer.output_bias is not None and dense.b_out is not None:
            layer.output_bias.data.copy_(dense.b_out)
        if linear:
            _fit_leaf_linear(layer, dense, x)
        return layer
