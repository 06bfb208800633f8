"""Mixture-of-Depths after training (`--to mod`): a router in front of whole blocks, real skipping.

Mixture-of-Depths (Raposo et al. 2024) puts a router (a linear map H -> 1: one score per token) in
front of a block; only the top `capacity` fraction of each sequence's real tokens (expert choice per
sequence; padding never counts) goes through the block, the others ride the residual stream
unchanged. The routed tokens are gathered into a shorter sequence, the block runs on that sequence
alone and the result is scattered back: the executed graph, and so the FLOP count and the latency,
see only the routed tokens. `--attention routed` (the paper's choice, any encoder block: the original
block's forward on the gathered sequence) lets a routed token attend to the other routed tokens only;
`--attention all` (BERT and RoBERTa blocks) lets it attend over every real token's keys and values
(the key and value projections run on every token, the rest on the routed ones), which halves the
block's error at capacity 0.5 for a little more work (docs/mod.md). The block's update of a routed token is scaled by g = 2 * sigmoid(score): 1 at score 0,
so a router that scores near 0 leaves the block as it was, and the router gets a gradient from what
the update does (as in the paper, where the router weight multiplies the block's output).

Conversion, on block units captured as whole calls (ccli.capture.BlockCalls):
1. the router is initialised from a cheap signal, how much the original block changes each token
   (the log of the update's norm, centred per sequence), by ridge regression from the block's input,
   then scaled so that its scores start near 0 (g near 1);
2. layer by layer (`--train`) the block's own weights (by default; the router keeps its fit), the
   router, or both are trained so that the routed block's outputs match the original block's;
3. optionally end to end (the shared engine), the routed blocks trained together (their routers too
   unless `--train block`, which keeps each router's fit throughout).

Decoders (GPT-2, the LLaMA family) decide per token with a predictor fitted to the router's top-k
choices, and every token leaves its K/V in a routed block's cache: ccli.variants.mod_causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..capture import gathered_rows
from ..errors import CcliError
from .base import BlockVariant, ConvertedModule, VariantConfig, option, wrap_block
from .mod_causal import bind_call, decoder_parts, mask_allows, real_query_tokens, run_routed

BLOCK_CHOICES = ("alternate", "all-but-first", "all")
ATTENTION_CHOICES = ("auto", "routed", "all")
TRAIN_CHOICES = ("block", "router", "both")
ROUTER_INIT_STD = 0.1  # std of the initial router scores: the update scale 2*sigmoid(s) starts within ~5% of 1


@dataclass
class MoDConfig(VariantConfig):
    family = "mod"
    capacity: float = option(0.5, "fraction of each sequence's real tokens a routed block processes", low=0.0, high=1.0)
    blocks: str = option("alternate", "which blocks are routed: alternate (1, 3, 5, ...: every other block, "
                                      "never the first), all-but-first, all, or block indices such as 1,3,5")
    attention: str = option("auto", "what a routed token attends to: routed (the other routed tokens, as in the "
                                    "paper; any encoder block), all (every real token's keys and values; BERT and "
                                    "RoBERTa blocks, and decoders, whose skipped tokens still fill the K/V cache) or "
                                    "auto (routed on encoders, all on decoders)", choices=ATTENTION_CHOICES)
    skip_rank: int = option(0, "rank of a linear update for the tokens a routed block skips, fitted to the block's "
                               "update by ridge regression and trained with the block; 0: skipped tokens ride the "
                               "residual unchanged, as in the paper", low=0)
    train: str = option("block", "what layer-wise training fits after the router's initial fit: block (the "
                                 "block's own weights; the router keeps its fit), router, or both", choices=TRAIN_CHOICES)

    def check(self) -> None:
        if self.capacity <= 0.0:
            raise CcliError(f"mod: --capacity must be above 0 (got {self.capacity!r})")
        if self.blocks not in BLOCK_CHOICES:
            parts = [p.strip() for p in self.blocks.split(",")]
            if not parts or not all(p.isdigit() for p in parts):
                raise CcliError(f"mod: --blocks must be one of {', '.join(BLOCK_CHOICES)} or block indices such as "
                                f"1,3,5 (got {self.blocks!r})")
            if len(set(parts)) != len(parts):
                raise CcliError(f"mod: --blocks names a block twice (got {self.blocks!r})")

    def block_indices(self, n_blocks: int) -> list[int]:
        if self.blocks == "alternate":
            return list(range(1, n_blocks, 2))
        if self.blocks == "all-but-first":
            return list(range(1, n_blocks))
        if self.blocks == "all":
            return list(range(n_blocks))
        picked = sorted(int(p) for p in self.blocks.split(","))
        if picked[-1] >= n_blocks:
            raise CcliError(f"mod: --blocks {picked[-1]} is out of range: the model has blocks 0-{n_blocks - 1}")
        return picked


def real_tokens(attention_mask: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor:
    """(batch, seq) bool: the real (non-padding) tokens, read off the block's attention mask (a key
    is real when some query may attend to it). Accepts the 4-D bool (True = attend) or additive float
    masks transformers passes to encoder blocks, a 2-D padding mask, or None (no padding)."""
    if attention_mask is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    mask = mask_allows(attention_mask)
    if mask.dim() == 2:
        return mask
    return mask.reshape(batch, -1, mask.shape[-2], seq).any(dim=(1, 2))


def _sub_mask(like: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor | None:
    """The attention mask of the gathered sequences (keys: the valid slots), in the form `like` has."""
    if like is None and bool(valid.all()):
        return None
    b, k = valid.shape
    if like is not None and like.dim() == 2:
        return valid.to(like.dtype)
    allowed = valid[:, None, None, :].expand(b, 1, k, k)
    if like is None or like.dtype == torch.bool:
        return allowed
    return torch.zeros((), dtype=like.dtype, device=like.device).masked_fill(~allowed, torch.finfo(like.dtype).min)


class MoDBlock(ConvertedModule):
    """A block with a router in front: only the top-`capacity` real tokens of each sequence run
    through it (gathered, the original block on them alone, scattered back); see the module doc.
    Build it with `MoDVariant.wrap` (it is the block itself, its parts at their paths)."""

    unit_kind = "block"

    def setup(self, hidden_size: int, capacity: float, attention: str = "auto", router_frozen: bool = False,
              skip_rank: int = 0) -> None:
        self.router = nn.Linear(hidden_size, 1)
        # the skipped tokens' update: x -> up(down(x)), rank skip_rank (fit_skip_path); None: identity
        self.skip = nn.Sequential(nn.Linear(hidden_size, skip_rank, bias=False), nn.Linear(skip_rank, hidden_size)) \
            if skip_rank > 0 else None
        self.router_frozen = router_frozen
        self.capacity = float(capacity)
        self.last_routing: dict | None = None
        self.decoder = decoder_parts(self)
        if self.decoder is not None:
            if attention == "routed":
                raise CcliError("mod: --attention routed is for encoders: on a decoder every token fills the K/V "
                                "cache and routed tokens attend over all of it (--attention all or auto)")
            # the causal decision: route a token when the predictor scores it above 0 (fit_predictor)
            self.predictor = nn.Linear(hidden_size, 1)
            attention = "all"
        elif attention == "auto":
            attention = "routed"
        self.attention_keys = attention
        if attention == "all" and self.decoder is None and not _bert_like(self):
            raise CcliError(f"mod: --attention all needs a BERT or RoBERTa block ({type(self).__bases__[-1].__name__} is "
                            "not one); use --attention routed")

    def train(self, mode: bool = True):
        # the block's own parts stay in eval mode (no dropout) while its weights or router are trained,
        # except converted modules inside it (an earlier recipe step's FFN): they train on their own
        # training path (an MoE's, with gradients, not its inference kernel)
        nn.Module.train(self, mode)
        for child in self.children():
            if child not in (self.router, getattr(self, "predictor", None), self.skip):
                child.eval()
        if mode:
            for module in self.modules():
                if module is not self and isinstance(module, ConvertedModule):
                    module.train(True)
        return self

    def block_forward(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        """The original block on every token."""
        out = super().forward(hidden_states, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out

    def routed_over_all_keys(self, routed: torch.Tensor, hidden_states: torch.Tensor, index: torch.Tensor,
                             valid: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """A BERT-style block on the routed tokens, their queries attending over every token's keys and
        values (K/V projections on all tokens, Q, output projection and FFN on the routed ones only)."""
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.bert.modeling_bert import eager_attention_forward

        sa = self.attention.self
        batch, k, _ = routed.shape
        seq = hidden_states.shape[1]
        keys = sa.key(hidden_states).view(batch, seq, -1, sa.attention_head_size).transpose(1, 2)
        values = sa.value(hidden_states).view(batch, seq, -1, sa.attention_head_size).transpose(1, 2)
        with gathered_rows(valid):
            q = sa.query(routed).view(batch, k, -1, sa.attention_head_size).transpose(1, 2)
        mask = attention_mask
        if mask is not None and mask.dim() == 4:  # the routed queries' rows of the block's mask
            mask = mask.expand(batch, mask.shape[1], seq, seq).gather(
                2, index[:, None, :, None].expand(batch, mask.shape[1], k, seq))
        elif mask is not None:  # a 2-D padding mask
            mask = mask.bool()[:, None, None, :].expand(batch, 1, k, seq)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(sa.config._attn_implementation, eager_attention_forward)
        context, _ = interface(sa, q, keys, values, mask, dropout=0.0, scaling=sa.scaling)
        with gathered_rows(valid):
            attended = self.attention.output(context.reshape(batch, k, -1).contiguous(), routed)
            return self.feed_forward_chunk(attended)

    def scores(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.router_frozen:  # `--train block`: the router keeps its fit, end to end too
            with torch.no_grad():
                return self.router(hidden_states).squeeze(-1)
        return self.router(hidden_states).squeeze(-1)

    @staticmethod
    def update_scale(scores: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(scores)

    def route(self, scores: torch.Tensor, real: torch.Tensor):
        return top_capacity(scores, real, self.capacity)

    def forward(self, hidden_states, *args, **kwargs):
        if self.decoder is not None:
            return self.causal_forward(hidden_states, bind_call(self, hidden_states, args, kwargs))
        return self.sequence_forward(hidden_states, *args, **kwargs)

    def decisions(self, hidden_states: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """(batch, seq) bool: the decoder's per-token choice (the predictor above 0; every real token
        at capacity 1). It depends on the token's own block input only, so it is causal."""
        if self.capacity >= 1.0:
            return real
        with torch.no_grad():
            return (self.predictor(hidden_states).squeeze(-1) > 0) & real

    def causal_forward(self, hidden_states, bound: dict) -> torch.Tensor:
        """Decoder blocks: per-token decisions, every token's K/V, the routed tokens through the rest."""
        if bound.get("encoder_hidden_states") is not None:
            raise CcliError("mod: routed blocks with cross-attention are not supported")
        batch, seq, hidden = hidden_states.shape
        real = real_query_tokens(bound.get("attention_mask"), batch, seq, hidden_states.device)
        routed = self.decisions(hidden_states, real)
        out, index, valid = run_routed(self.decoder, hidden_states, routed, bound)
        self.last_routing = {"capacity": self.capacity, "tokens": int(routed.sum()), "real_tokens": int(real.sum())}
        result = hidden_states
        if index.shape[1] > 0:
            rows = index[..., None].expand(-1, -1, hidden)
            routed_in = hidden_states.gather(1, rows)
            scale = self.update_scale(self.scores(routed_in))[..., None].to(out.dtype)
            update = torch.where(valid[..., None], (out - routed_in) * scale, torch.zeros_like(out))
            result = hidden_states.scatter_add(1, rows, update)
        return self.skip_update(hidden_states, result, real & ~routed)

    def skip_update(self, hidden_states, result, skipped: torch.Tensor) -> torch.Tensor:
        """`result` with the skip path's update added at the `skipped` (batch, seq) tokens, computed on
        those tokens only (without a skip path: unchanged, they ride the residual)."""
        if self.skip is None or not bool(skipped.any()):
            return result
        where = skipped.nonzero(as_tuple=True)
        return result.index_put(where, result[where] + self.skip(hidden_states[where]))

    def skipped_tokens(self, hidden_states, *args, **kwargs) -> torch.Tensor:
        """(batch, seq) bool: the real tokens this block's routing skips on this call (no block run)."""
        batch, seq, _ = hidden_states.shape
        mask = bind_call(self, hidden_states, args, kwargs).get("attention_mask")
        with torch.no_grad():
            if self.decoder is not None:
                real = real_query_tokens(mask, batch, seq, hidden_states.device)
                return real & ~self.decisions(hidden_states, real)
            real = real_tokens(mask, batch, seq, hidden_states.device)
            index, valid, _ = self.route(self.scores(hidden_states), real)
            return real & ~_chosen(index, valid, seq)

    def sequence_forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        """Encoder blocks: the top-capacity real tokens of each sequence (expert choice)."""
        batch, seq, hidden = hidden_states.shape
        real = real_tokens(attention_mask, batch, seq, hidden_states.device)
        scores = self.scores(hidden_states)
        index, valid, k = self.route(scores, real)
        rows = index[..., None].expand(-1, -1, hidden)
        routed = hidden_states.gather(1, rows)
        if self.attention_keys == "all":
            out = self.routed_over_all_keys(routed, hidden_states, index, valid, attention_mask)
        else:
            with gathered_rows(valid):
                out = self.block_forward(routed, _sub_mask(attention_mask, valid), *args, **kwargs)
        scale = self.update_scale(scores.gather(1, index)) * valid
        result = hidden_states.scatter_add(1, rows, (out - routed) * scale[..., None].to(out.dtype))
        self.last_routing = {"capacity": self.capacity, "tokens": int(k.sum()), "real_tokens": int(real.sum())}
        if self.skip is None:
            return result
        return self.skip_update(hidden_states, result, real & ~_chosen(index, valid, seq))

    def routing(self) -> dict | None:
        return self.last_routing


def top_capacity(scores: torch.Tensor, real: torch.Tensor, capacity: float):
    """Expert choice per sequence: (index, valid, k), each sequence's k_b = ceil(capacity * real)
    best-scored real tokens (at least 1) as positions in increasing order (batch, k_max), and which
    of those slots are used."""
    n_real = real.sum(dim=1)
    k = torch.clamp(torch.ceil(n_real.to(torch.float64) * capacity).to(torch.long), min=1)
    k = torch.minimum(k, n_real.clamp(min=1))
    k_max = int(k.max())
    seq = scores.shape[1]
    top = scores.masked_fill(~real, float("-inf")).topk(k_max, dim=1).indices
    valid = torch.arange(k_max, device=scores.device)[None, :] < k[:, None]
    index = torch.where(valid, top, torch.full_like(top, seq)).sort(dim=1).values
    return index.clamp(max=seq - 1), valid, k


def _chosen(index: torch.Tensor, valid: torch.Tensor, seq: int) -> torch.Tensor:
    """(batch, seq) bool from the routed slots (index, valid) of `route`."""
    return torch.zeros(index.shape[0], seq, dtype=torch.bool, device=index.device).scatter(1, index, valid)


def _bert_like(block: nn.Module) -> bool:
    attention = getattr(block, "attention", None)
    return (hasattr(block, "feed_forward_chunk") and hasattr(attention, "self") and hasattr(attention, "output")
            and all(hasattr(attention.self, n) for n in ("query", "key", "value", "scaling")))


def block_updates(module: MoDBlock, calls) -> list[torch.Tensor]:
    """The original block's update `block(x) - x` on each captured call (every token), computed once
    for every initialiser that needs it (the router's signal, the skip path's target)."""
    with torch.no_grad():
        return [module.block_forward(call.hidden, **call.kwargs) - call.hidden for call in getattr(calls, "data", calls)]


def _router_targets(calls, updates: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block inputs and the cheap ranking signal: log of how much the block changes each real token,
    centred per sequence (ranking is per sequence)."""
    xs, ts = [], []
    with torch.no_grad():
        for call, update in zip(getattr(calls, "data", calls), updates):
            signal = torch.log(update.norm(dim=-1) + 1e-6)
            for b in range(call.hidden.shape[0]):
                real = call.real[b]
                t = signal[b][real]
                xs.append(call.hidden[b][real])
                ts.append(t - t.mean())
    return torch.cat(xs), torch.cat(ts)


def init_router(module: MoDBlock, calls, updates: list[torch.Tensor], ridge: float = 1e-2) -> float:
    """Fit the router to rank tokens by how much the block changes them (ridge regression; `updates`
    from `block_updates`), scaled so its scores start with std ROUTER_INIT_STD. Returns the
    correlation of the fitted scores with the signal on the captured tokens."""
    x, t = _router_targets(calls, updates)
    x = x.double()
    mean = x.mean(0)
    xc = x - mean
    gram = xc.T @ xc / len(x)
    w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ t.double() / len(x))
    fitted = xc @ w
    std = float(fitted.std()) or 1.0
    w = w * (ROUTER_INIT_STD / std)
    with torch.no_grad():
        module.router.weight.copy_(w[None, :].to(module.router.weight.dtype))
        module.router.bias.copy_((-(mean @ w))[None].to(module.router.bias.dtype))
    return float(torch.corrcoef(torch.stack([fitted, t.double()]))[0, 1])


def fit_skip_path(module: MoDBlock, calls, updates: list[torch.Tensor], ridge: float = 1e-2) -> float:
    """Fit the skip path to the block's own update on the tokens the routing skips (captured calls):
    ridge regression from the block input, cut to the skip path's rank (reduced-rank regression:
    the fitted map projected on the top right singular vectors of its outputs). Returns the share of
    the skipped tokens' update variance it explains."""
    xs, targets = [], []
    with torch.no_grad():
        for call, update in zip(getattr(calls, "data", calls), updates):
            skipped = module.skipped_tokens(call.hidden, **call.kwargs) & call.real
            xs.append(call.hidden[skipped])
            targets.append(update[skipped])
    x, u = torch.cat(xs).double(), torch.cat(targets).double()
    if len(x) < 2:
        return 0.0
    x_mean, u_mean = x.mean(0), u.mean(0)
    xc, uc = x - x_mean, u - u_mean
    w = torch.linalg.solve(xc.T @ xc + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype), xc.T @ uc)
    rank = module.skip[0].out_features
    _, _, vh = torch.linalg.svd(xc @ w, full_matrices=False)
    basis = vh[:rank]  # (rank, H): the directions of the update the rank can carry
    down, up = w @ basis.T, basis  # x W P = (x W V_r) V_r^T
    explained = 1.0 - float(((uc - xc @ down @ up) ** 2).sum() / (uc ** 2).sum().clamp(min=1e-30))
    with torch.no_grad():
        module.skip[0].weight.zero_()
        module.skip[0].weight[: down.shape[1]].copy_(down.T.to(module.skip[0].weight.dtype))
        module.skip[1].weight.zero_()
        module.skip[1].weight[:, : up.shape[0]].copy_(up.T.to(module.skip[1].weight.dtype))
        module.skip[1].bias.copy_((u_mean - x_mean @ down @ up).to(module.skip[1].bias.dtype))
    return explained


def fit_predictor(predictor: nn.Linear, router: nn.Linear, calls, capacity: float, iterations: int = 60) -> float:
    """Fit a decoder's `predictor` (route when it scores above 0) to reproduce the router's
    per-sequence top-capacity choices (`top_capacity`) on the captured calls: logistic regression
    from the router's own direction, then its bias set so that it routes `capacity` of the
    calibration tokens. Returns its accuracy there."""
    xs, labels = [], []
    with torch.no_grad():
        for call in getattr(calls, "data", calls):
            index, valid, _ = top_capacity(router(call.hidden).squeeze(-1), call.real, capacity)
            xs.append(call.hidden[call.real])
            labels.append(_chosen(index, valid, call.real.shape[1])[call.real])
    x, y = torch.cat(xs).double(), torch.cat(labels)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = (router.weight[0].double() * std).detach().clone()
    w = (w / w.norm().clamp(min=1e-12)).requires_grad_(True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=iterations, line_search_fn="strong_wolfe")
    target = y.double()

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(z @ w + b, target) + 1e-4 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        logits = z @ w
        threshold = torch.quantile(logits, 1.0 - capacity) if capacity < 1.0 else logits.min() - 1.0
        weight = w / std
        predictor.weight.copy_(weight[None, :].to(predictor.weight.dtype))
        predictor.bias.copy_((-(mean @ weight) - threshold)[None].to(predictor.bias.dtype))
        decided = predictor(x.to(predictor.weight.dtype)).squeeze(-1) > 0
    return float((decided == y).double().mean())


class MoDVariant(BlockVariant):
    name = "mod"
    config = MoDConfig

    def layers(self, n_blocks: int) -> list[int]:
        return self.cfg.block_indices(n_blocks)

    def units(self, arch, block: int):
        if self.cfg.train != "block" and decoder_parts(arch.blocks[block].module) is not None:
            raise CcliError(f"mod: --train {self.cfg.train} is for encoders: a decoder's per-token predictor is fitted "
                            "to the router's choices, so the router keeps its fit (--train block)")
        return super().units(arch, block)

    @classmethod
    def wrap(cls, block: nn.Module, spec: dict) -> MoDBlock:
        from ..arch import _hidden_of

        block = wrap_block(MoDBlock, block)
        block.setup(_hidden_of(block), spec["capacity"], spec.get("attention", "auto"),
                    router_frozen=spec.get("train", "block") == "block", skip_rank=spec.get("skip_rank", 0))
        return block

    def init_from_block(self, module: MoDBlock, calls, seed: int) -> None:
        for name, p in module.named_parameters():
            is_router = name.startswith("router.")
            p.requires_grad_(self.cfg.train == "both" or (self.cfg.train == "router") == is_router)
        updates = block_updates(module, calls)
        record = {"router_correlation": init_router(module, calls, updates)}
        if module.decoder is not None:
            module.predictor.requires_grad_(False)  # a decision, not trained by gradient
            record["predictor_accuracy"] = fit_predictor(module.predictor, module.router, calls, self.cfg.capacity)
        if module.skip is not None:
            record["skip_explained"] = fit_skip_path(module, calls, updates)
        module.init_record = record  # reported with the layer (ccli.distill.LayerReport.init)

