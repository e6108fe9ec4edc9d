"""One LLaMA-style decoder with ``n_future_tokens`` output heads, in Meta's layout.

Layout (Gloeckle et al. 2024, and Meta's released 7B_1T_4 checkpoint):

* ``layers[:-1]`` is the shared trunk; ``layers[-1]`` is the head-1 block; ``extra_heads[i]``
  is the block of head ``i + 2``. Every head block reads the same trunk output (heads are
  parallel, not chained) and all heads share ``norm`` and ``output``.
* ``n_layers`` counts every block (trunk and heads), as Meta's ``params.json`` does, so
  ``len(layers) == n_layers - n_future_tokens + 1``.
* With ``n_future_tokens == 1`` this is a plain LLaMA: the reference model and the critic
  backbone use it.

RoPE follows Meta's convention (adjacent channel pairs as complex numbers); Hugging Face
checkpoints are converted to it with the q/k row permutation in ``checkpoints.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def ffn_hidden_size(
    dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
) -> int:
    """LLaMA's SwiGLU hidden size: 2/3 of 4*dim, scaled, rounded up to ``multiple_of``."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


@dataclass
class ModelArgs:
    """Sizes of the model; the names are those of Meta's ``params.json``.

    ``ffn_hidden_dim`` overrides the rounding rule when given (the micro models use 1365,
    which the rule only reaches with ``multiple_of=1``).
    """

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    ffn_hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    n_future_tokens: int = 1

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(
                f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}"
            )
        if (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim {self.dim // self.n_heads} must be even for RoPE")
        if self.n_future_tokens < 1:
            problems.append(f"n_future_tokens must be >= 1, got {self.n_future_tokens}")
        if self.n_layers < self.n_future_tokens:
            problems.append(
                f"n_layers {self.n_layers} < n_future_tokens {self.n_future_tokens}: "
                "every head needs its own block"
            )
        if self.vocab_size <= 0:
            problems.append(f"vocab_size must be positive, got {self.vocab_size}")
        if problems:
            raise ValueError("invalid model args: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return ffn_hidden_size(self.dim, self.multiple_of, self.ffn_dim_multiplier)

    @property
    def n_trunk_layers(self) -> int:
        return self.n_layers - self.n_future_tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelArgs:
        """Build from a dict, ignoring keys that are not fields (e.g. ``max_batch_size``)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 whatever the compute dtype, then cast back (as Meta's reference).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_angles(head_dim: int, max_positions: int, theta: float) -> Tensor:
    """``[max_positions, head_dim/2, 2]`` cos/sin table of Meta's complex RoPE."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` ``[B, T, H, D]`` by ``rope`` ``[T, D/2, 2]``.

    Eager: one complex multiplication, as Meta's reference writes it, the same numbers as the
    four real products on strided pairs and about 5x faster forward and backward on CPU.
    Under ``torch.compile`` the real products, which inductor fuses (it has no complex
    kernels) (docs/DECISIONS.md 2026-12-01). ``rope`` is fp32 whatever the model's dtype
    (``Transformer._apply``), so the rotation is computed in fp32."""
    if torch.compiler.is_compiling():
        xf = x.float().unflatten(-1, (-1, 2))
        cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]
        real = xf[..., 0] * cos - xf[..., 1] * sin
        imag = xf[..., 0] * sin + xf[..., 1] * cos
        return torch.stack([real, imag], dim=-1).flatten(-2).type_as(x)
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    turn = torch.view_as_complex(rope)[None, :, None, :]
    return torch.view_as_real(pairs * turn).flatten(-2).type_as(x)


class KVCache(nn.Module):
    """Keys and values of one attention layer for ``max_batch`` rows and ``max_len`` positions."""

    def __init__(self, max_batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` ``[B, Hkv, T, D]`` at ``start`` and return everything up to the end."""
        batch, end = k.shape[0], start + k.shape[2]
        self.k[:batch, :, start:end] = k
        self.v[:batch, :, start:end] = v
        return self.k[:batch, :, :end], self.v[:batch, :, :end]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: Tensor, rope: Tensor, start_pos: int | None = None) -> Tensor:
        """Causal self-attention; with ``start_pos`` it reads and extends the KV cache."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if start_pos is None:
            mask, causal = None, True
        else:
            if self.cache is None:
                raise RuntimeError("start_pos given but no KV cache: call setup_caches() first")
            k, v = self.cache.update(start_pos, k, v)
            # Query i sits at absolute position start_pos + i and sees keys 0..start_pos + i.
            key_pos = torch.arange(k.shape[2], device=x.device)
            query_pos = torch.arange(seqlen, device=x.device) + start_pos
            mask, causal = key_pos[None, :] <= query_pos[:, None], False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, start_pos: int | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, start_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """LLaMA decoder with ``n_future_tokens`` parallel head blocks (Meta's MTP layout)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.n_future_tokens = args.n_future_tokens
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_trunk_layers + 1))
        self.extra_heads = nn.ModuleList(
            TransformerBlock(args) for _ in range(args.n_future_tokens - 1)
        )
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.activation_checkpointing = False

    def _block(
        self, block: TransformerBlock, h: Tensor, rope: Tensor, start_pos: int | None
    ) -> Tensor:
        # Recompute each block in backward instead of storing its activations: the names of
        # the parameters stay as they are (no wrapper module), so checkpoints do not change.
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, rope, start_pos, use_reentrant=False)
        return block(h, rope, start_pos)

    def _rope_table(self) -> Tensor:
        # Meta precomputes 2 * max_seq_len positions; we do the same so lengths match.
        return rope_angles(self.args.head_dim, 2 * self.args.max_seq_len, self.args.rope_theta)

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> Transformer:
        """``.to(dtype)``, ``.half()``, ... cast buffers too; the RoPE table stays fp32 (in bf16
        its cos/sin would keep 8 significant bits), recomputed rather than cast back."""
        super()._apply(fn, recurse)
        if self.rope.dtype != torch.float32 and not self.rope.is_meta:
            self.rope = self._rope_table().to(self.rope.device)
        return self

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Recompute the RoPE table (needed after building on the meta device)."""
        self.rope = self._rope_table().to(device or self.output.weight.device)

    @property
    def head_blocks(self) -> list[TransformerBlock]:
        """Block of head k (1-based) is ``head_blocks[k - 1]``."""
        return [self.layers[-1], *self.extra_heads]

    def _positions(self, start: int, length: int) -> Tensor:
        if start + length > self.rope.shape[0]:
            raise ValueError(
                f"sequence end {start + length} exceeds the RoPE table "
                f"({self.rope.shape[0]} = 2 * max_seq_len positions)"
            )
        return self.rope[start : start + length]

    def trunk(self, tokens: Tensor, start_pos: int | None = None) -> Tensor:
        """Hidden states after the shared trunk ``layers[:-1]``: ``[B, T, dim]``."""
        rope = self._positions(start_pos or 0, tokens.shape[1])
        h = self.tok_embeddings(tokens)
        for layer in self.layers[:-1]:
            h = self._block(layer, h, rope, start_pos)
        return h

    def head_hidden(self, h_trunk: Tensor, head: int, start_pos: int | None = None) -> Tensor:
        """Output of head block ``head`` (0-based; 0 is next-token) before the final norm."""
        rope = self._positions(start_pos or 0, h_trunk.shape[1])
        return self._block(self.head_blocks[head], h_trunk, rope, start_pos)

    def unembed(self, z: Tensor) -> Tensor:
        """Shared final norm and output projection."""
        return self.output(self.norm(z))

    def hidden_states(self, tokens: Tensor) -> Tensor:
        """Normalised last hidden states of head 1 ``[B, T, dim]`` (the critic's features)."""
        return self.norm(self.head_hidden(self.trunk(tokens), 0))

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits of every head: ``[B, T, n_future_tokens, vocab]``; head k predicts t+k."""
        h = self.trunk(tokens)
        return torch.stack(
            [self.unembed(self.head_hidden(h, k)) for k in range(self.n_future_tokens)], dim=2
        )

    # ---- inference with a KV cache ----

    def setup_caches(
        self,
        max_batch: int,
        max_len: int,
        n_heads: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Allocate KV caches for the trunk and the first ``n_heads`` head blocks only."""
        if not 1 <= n_heads <= self.n_future_tokens:
            raise ValueError(f"n_heads must be in 1..{self.n_future_tokens}, got {n_heads}")
        dtype = dtype or self.output.weight.dtype
        device = device or self.output.weight.device
        self.clear_caches()
        for block in [*self.layers[:-1], *self.head_blocks[:n_heads]]:
            block.attention.cache = KVCache(
                max_batch, max_len, self.args.n_kv_heads, self.args.head_dim, dtype, device
            )

    def clear_caches(self) -> None:
        for block in [*self.layers, *self.extra_heads]:
            block.attention.cache = None

    @torch.no_grad()
    def forward_cached(
        self, tokens: Tensor, start_pos: int, n_heads: int = 1, last_only: bool = False
    ) -> Tensor:
        """Logits ``[B, T, n_heads, vocab]`` for ``tokens`` placed at ``start_pos``, extending
        the caches. Earlier positions must already be in the caches of the heads used.
        ``last_only``: logits of the last position only (``T`` = 1), e.g. after a prompt."""
        h = self.trunk(tokens, start_pos)
        hidden = torch.stack([self.head_hidden(h, k, start_pos) for k in range(n_heads)], dim=2)
        # One call for every head: the output matrix is read once, not once per head.
        return self.unembed(hidden[:, -1:] if last_only else hidden)


def init_weights(model: Transformer, seed: int = 42) -> None:
    """Xavier-uniform on every matrix, ones on norms, with a local generator (reproducible)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                fan_out, fan_in = param.shape[0], param.shape[1]
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                values = torch.empty(param.shape, dtype=torch.float32)
                values.uniform_(-bound, bound, generator=gen)
                param.copy_(values)
            elif name.endswith("norm.weight"):
                param.fill_(1.0)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
