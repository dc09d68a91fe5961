"""nanoGPT-style decoder-only transformer, written as a flat list of pipeline-splittable layers.

Layers: ``Embedding`` (token + learned position), ``n_layer`` pre-LN ``Block``s, and ``Head``
(final LayerNorm + Linear to the vocabulary). Each takes and returns one tensor, so DeepSpeed's
PipelineModule can cut between any two (``partition_method="type:Block"`` balances blocks).

The output projection is NOT tied to the token embedding, unlike nanoGPT/GPT-2: a tied weight
would live on both the first and the last pipeline stage, which PipelineModule only supports
through its TiedLayerSpec machinery. The cost is one extra ``vocab_size x d_model`` matrix, so
"gpt2-124m" holds ~163M parameters in total (~124M without the two embedding tables).
"""

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from bigopt.models.base import (
    Device,
    LayeredModel,
    RngSnapshot,
    full_numel,
    require_dropout,
    require_positive_int,
)

# Named sizes: the one table is pure data in ``bigopt.presets``, so the spec validates
# ``model.preset`` against it without importing torch.
from bigopt.presets import GPT_PRESETS  # noqa: F401  (re-exported: bigopt.models.GPT_PRESETS)


class Embedding(nn.Module):
    """Token + learned position embedding: LongTensor ``[B, T]`` -> float ``[B, T, C]``."""

    def __init__(self, vocab_size: int, context: int, d_model: int, dropout: float) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.size(1)
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the model's context {self.context}")
        pos = torch.arange(t, device=idx.device)
        return self.drop(self.tok(idx) + self.pos(pos))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention using the fused SDPA kernel (flash where available).

    The attention width ``n_head * head_dim`` is ``d_model`` in a standard GPT; it is smaller
    after attention heads have been pruned away (``bigopt.compress.prune``).
    """

    def __init__(self, d_model: int, n_head: int, dropout: float, head_dim: int | None = None) -> None:
        super().__init__()
        self.n_head = n_head
        self.head_dim = d_model // n_head if head_dim is None else head_dim
        self.dropout = dropout
        inner = n_head * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner)
        self.proj = nn.Linear(inner, d_model)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        inner = self.n_head * self.head_dim
        # [B, T, 3 * inner] -> 3 x [B, n_head, T, head_dim]; written as one view + unbind (not
        # split + view) because that is the pattern Torch-Pruning's dependency graph follows
        # when it removes whole heads
        q, k, v = self.qkv(x).view(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(b, t, inner)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    """The GELU MLP of a transformer block: ``d_ff`` hidden units, 4 x d_model by default."""

    def __init__(self, d_model: int, dropout: float, d_ff: int | None = None) -> None:
        super().__init__()
        d_ff = 4 * d_model if d_ff is None else d_ff
        self.fc = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    With ``checkpointing`` the block's activations are recomputed in backward instead of
    stored, trading ~1/3 more compute for memory that no longer grows with depth. Non-reentrant
    checkpointing is used because it works with inputs that do not require grad and with
    DeepSpeed's pipeline engine.
    """

    def __init__(
        self, d_model: int, n_head: int, dropout: float, *, checkpointing: bool = False,
        d_ff: int | None = None, head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout, head_dim)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, dropout, d_ff)

    def _forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def forward(self, x: Tensor) -> Tensor:
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)


class Head(nn.Module):
    """Final LayerNorm + projection to vocabulary logits ``[B, T, vocab_size]``."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


class GPT(LayeredModel):
    """Decoder-only language model: ``Embedding``, ``n_layer`` x ``Block``, ``Head``.

    Input is a LongTensor of token ids ``[B, T]`` with ``T <= context``; output is logits
    ``[B, T, vocab_size]``; the target for ``loss`` is the next-token ids ``[B, T]``.

    ``d_ff`` (feed-forward hidden units, default ``4 * d_model``) and ``head_dim`` (default
    ``d_model // n_head``) are there for structurally pruned models (``bigopt.compress.prune``
    removes hidden units and whole heads); ``arch()`` leaves them out at their defaults.
    """

    kind = "gpt"

    def __init__(
        self,
        vocab_size: int = 256,
        context: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
        activation_checkpointing: bool = False,
        d_ff: int | None = None,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in [
            ("vocab_size", vocab_size),
            ("context", context),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("d_model", d_model),
        ]:
            require_positive_int(name, value)
        for name, value in [("d_ff", d_ff), ("head_dim", head_dim)]:
            if value is not None:
                require_positive_int(name, value)
        if head_dim is None and d_model % n_head:
            raise ValueError(
                f"d_model ({d_model}) must be divisible by n_head ({n_head}) so each head gets "
                f"d_model // n_head channels; pick e.g. n_head={_divisor_near(d_model, n_head)}"
            )
        self.vocab_size = vocab_size
        self.context = context
        self.n_layer = n_layer
        self.n_head = n_head
        self.d_model = d_model
        self.dropout = require_dropout(dropout)
        self.activation_checkpointing = bool(activation_checkpointing)
        self.d_ff = 4 * d_model if d_ff is None else d_ff
        self.head_dim = d_model // n_head if head_dim is None else head_dim

        rng = RngSnapshot()  # before any layer draws its default init; see _finish_init
        self.embedding = Embedding(vocab_size, context, d_model, self.dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, self.dropout, checkpointing=self.activation_checkpointing,
                  d_ff=self.d_ff, head_dim=self.head_dim)
            for _ in range(n_layer)
        )
        self.head = Head(d_model, vocab_size)
        self._finish_init(rng)

    def _init_weights(self) -> None:
        # nanoGPT / GPT-2 init: N(0, 0.02) everywhere, and the projections that write into the
        # residual stream scaled by 1/sqrt(2 * n_layer) so the residual variance stays ~constant
        # with depth (two residual adds per block). Through _init_param, one parameter at a
        # time, so a ZeRO-3 partitioned model gets the same draws in the same order.
        def normal(std: float) -> Callable[[Tensor], Tensor]:
            return lambda t: nn.init.normal_(t, mean=0.0, std=std)

        for module in self.modules():
            if isinstance(module, nn.Linear):
                self._init_param(module.weight, normal(0.02))
                if module.bias is not None:
                    self._init_param(module.bias, nn.init.zeros_)
            elif isinstance(module, nn.Embedding):
                self._init_param(module.weight, normal(0.02))
        resid_std = 0.02 / math.sqrt(2 * self.n_layer)
        for block in self.blocks:
            self._init_param(block.attn.proj.weight, normal(resid_std))
            self._init_param(block.mlp.proj.weight, normal(resid_std))

    def layers(self) -> list[nn.Module]:
        return [self.embedding, *self.blocks, self.head]

    def num_params(self, *, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding=True`` leaves out the token and position tables.

        The untied output projection is kept in the non-embedding count because, unlike an
        embedding lookup, it is a real matmul whose FLOPs ``flops_per_sample`` must include.
        Counts full sizes also when ZeRO-3 has partitioned the parameters.
        """
        n = super().num_params()
        if non_embedding:
            n -= full_numel(self.embedding.tok.weight) + full_numel(self.embedding.pos.weight)
        return n

    def flops_per_sample(self) -> float:
        """PaLM / nanoGPT estimate: per token ``6 N + 12 L d T`` (N non-embedding params).

        ``6 N`` is forward (2) + backward (4) of every weight matmul; ``12 L d T`` is the
        attention score and value matmuls over a full context T (the causal mask is not
        credited, as in the PaLM MFU convention), with d the attention width
        ``n_head * head_dim`` (``d_model`` unless heads were pruned). A sample is ``context``
        tokens.
        """
        per_token = 6 * self.num_params(non_embedding=True) + 12 * (
            self.n_layer * self.n_head * self.head_dim * self.context
        )
        return float(per_token * self.context)

    def example_input(self, batch_size: int, *, device: Device = None) -> tuple[Tensor, Tensor]:
        # input and target are one random stream shifted by a token, as in LM training
        seq = torch.randint(0, self.vocab_size, (batch_size, self.context + 1), device=device)
        return seq[:, :-1].contiguous(), seq[:, 1:].contiguous()

    def arch(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "context": self.context,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "d_model": self.d_model,
            "dropout": self.dropout,
            "activation_checkpointing": self.activation_checkpointing,
            # only when not the default, so arch dicts (and trial records) of unpruned models
            # stay what they were before these keys existed
            **({"d_ff": self.d_ff} if self.d_ff != 4 * self.d_model else {}),
            **({"head_dim": self.head_dim}
               if self.d_model % self.n_head or self.head_dim != self.d_model // self.n_head else {}),
        }


def _divisor_near(d_model: int, n_head: int) -> int:
    """The divisor of d_model closest to the requested head count, for the error message."""
    return min(
        (h for h in range(1, d_model + 1) if d_model % h == 0), key=lambda h: abs(h - n_head)
    )
