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

import functools
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


DECODE_GEMM_MAX_ROWS = 256
"""Most rows for which ``decode_linear`` computes the transposed product on a CPU."""


def decode_linear(x: Tensor, weight: Tensor, pad_one_row: bool = False) -> Tensor:
    """``F.linear(x, weight)`` (no bias) for the KV-cache path: the same sums, ordered for
    speed on a CPU; the result may be a transposed (non-contiguous) view.

    For a few rows (a decoding step: one per sequence) MKL's fp32 GEMM is faster computing
    ``weight @ x.T`` than ``x @ weight.T``, 15-30% at 16-64 rows on the micro shapes; with
    ``pad_one_row`` (the output projection, [V, dim] too large for the caches) a single row is
    fed twice, since MKL's matrix-vector kernel reads the matrix at a third of the speed its
    two-column GEMM does (docs/EVALUATION.md §1, "Decoding"). Elsewhere, and for more rows
    (a prefill), plain ``F.linear``.
    """
    rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or rows > DECODE_GEMM_MAX_ROWS or (rows == 1 and not pad_one_row):
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        flat = flat.expand(2, -1).contiguous()
    out = (weight @ flat.t())[:, :rows].t()
    return out.reshape(*x.shape[:-1], weight.shape[0])


@functools.cache
def bf16_matmul_is_native() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX, via oneDNN);
    elsewhere bf16 products are emulated and slower than fp32."""
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):
        return False


SCREEN_MAX_CANDIDATES = 64
"""Candidates per row (on average) above which ``ArgmaxScreen`` computes every logit."""
SCREEN_BLOCK = 128
"""Tokens per block whose maximum ``ArgmaxScreen`` compares before looking inside."""


def _mkldnn_pack(weight: Tensor, rows: int) -> Tensor | None:
    """``weight`` reordered by oneDNN for products with ``rows`` rows (the layout its
    ``_linear_pointwise`` reads fastest), or None where this build has no such ops."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        probe = torch.zeros(rows, weight.shape[1], dtype=weight.dtype)
        torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return packed


class ArgmaxScreen:
    """The argmax of ``z @ weight.T`` (fp32 logits) from a bf16 product and a few fp32 dots.

    The bf16 product (inputs rounded to 8 significant bits, products summed in fp32, the
    result rounded to bf16) is within ``coeff * ||z||`` of every fp32 logit: relative errors
    of 2^-8 on each input and on the output and ``dim`` * 2^-24 for the fp32 sum bound
    ``|score - logit| <= (3 * 2^-8 + dim * 2^-24) * sum |z_i w_i|``, and
    ``sum |z_i w_i| <= ||z|| * max_v ||w_v||`` (Cauchy-Schwarz); ``coeff`` takes a quarter
    more. So a token whose score is more than twice that below the top score has a logit
    below the top-scoring token's, and the argmax is among the tokens within that margin; their
    logits are computed in fp32 and the largest wins (the first on a tie, as ``argmax``).
    The same token as the full fp32 product's argmax, up to how that product itself rounds,
    for a third to a quarter of its cost on a CPU with bf16 hardware (docs/EVALUATION.md §1).
    The bf16 matrix is packed by oneDNN for ``rows`` rows where this build allows.
    """

    def __init__(self, weight: Tensor, rows: int):
        self.weight, self.rows = weight, rows
        self.weight_bf16 = weight.to(torch.bfloat16)
        self.packed = _mkldnn_pack(self.weight_bf16, rows) if weight.device.type == "cpu" else None
        unit = 2.0**-8
        per_norm = 3 * unit + 4 * unit * unit + weight.shape[1] * 2.0**-24
        self.coeff = 1.25 * per_norm * float(weight.float().norm(dim=-1).max())

    def scores(self, z: Tensor) -> Tensor:
        """The bf16 product ``[B, V]``."""
        zb = z.to(torch.bfloat16)
        if self.packed is not None and z.shape[0] == self.rows:
            return torch.ops.mkldnn._linear_pointwise(zb, self.packed, None, "none", [], "")
        return F.linear(zb, self.weight_bf16)

    def argmax(self, z: Tensor) -> Tensor:
        """``[B, dim]`` fp32 -> ``[B]``: the index of each row's largest logit."""
        scores = self.scores(z)
        batch, vocab = scores.shape
        # Block maxima first: one pass over the scores finds the top score and the few
        # blocks that can hold a candidate; only those are searched.
        n_blocks = -(-vocab // SCREEN_BLOCK)
        if vocab % SCREEN_BLOCK:
            scores = F.pad(scores, (0, n_blocks * SCREEN_BLOCK - vocab), value=-math.inf)
        blocks = scores.view(batch, n_blocks, SCREEN_BLOCK)
        block_max = blocks.amax(-1)
        threshold = block_max.amax(-1).float() - 2 * self.coeff * z.norm(dim=-1)
        hit_rows, hit_blocks = (block_max >= threshold[:, None]).nonzero(as_tuple=True)
        inside, offset = (blocks[hit_rows, hit_blocks] >= threshold[hit_rows, None]).nonzero(
            as_tuple=True
        )
        rows, cols = hit_rows[inside], hit_blocks[inside] * SCREEN_BLOCK + offset
        if cols.numel() > SCREEN_MAX_CANDIDATES * batch:
            return decode_linear(z, self.weight, pad_one_row=True).max(-1).indices
        exact = (self.weight[cols] * z[rows]).sum(-1)
        best = torch.full((batch,), -math.inf, device=z.device, dtype=exact.dtype)
        best = best.scatter_reduce(0, rows, exact, "amax")
        won = exact == best[rows]
        out = torch.full((batch,), vocab, device=z.device, dtype=torch.long)
        out = out.scatter_reduce(0, rows[won], cols[won], "amin")
        unscreened = out == vocab  # a row without candidates (NaN): its plain argmax
        if bool(unscreened.any()):
            out[unscreened] = F.linear(z[unscreened], self.weight).argmax(-1)
        return out


class KVCache(nn.Module):
    """Keys and values of one attention layer for ``max_batch`` rows and ``max_len`` positions.

    Left uninitialised: ``update`` returns the written prefix only, so nothing else is read."""

    def __init__(self, max_batch: int, max_len: int, n_kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (max_batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)

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

    def forward(
        self, x: Tensor, rope: Tensor, start_pos: int | None = None, last_only: bool = False
    ) -> Tensor:
        """Causal self-attention; with ``start_pos`` it reads and extends the KV cache (and with
        ``last_only`` returns the last position's output only, ``[B, 1, dim]``)."""
        if start_pos is not None:
            return self._forward_cached(x, rope, start_pos, last_only)
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))

    def _forward_cached(self, x: Tensor, rope: Tensor, start_pos: int, last_only: bool) -> Tensor:
        """The KV-cache path (inference only): the same attention as ``forward``, over the
        filled prefix of the cache, with ``decode_linear`` projections. With ``last_only``
        keys and values are still computed (and cached) for every position, queries only for
        the last."""
        if self.cache is None:
            raise RuntimeError("start_pos given but no KV cache: call setup_caches() first")
        bsz, seqlen, _ = x.shape
        k = decode_linear(x, self.wk.weight).reshape(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = decode_linear(x, self.wv.weight).reshape(bsz, seqlen, self.n_kv_heads, self.head_dim)
        k = apply_rope(k.contiguous(), rope)
        k, v = self.cache.update(start_pos, k.transpose(1, 2), v.transpose(1, 2))
        if last_only:
            x, rope = x[:, -1:], rope[-1:]
        n_q = x.shape[1]
        q = decode_linear(x, self.wq.weight).reshape(bsz, n_q, self.n_heads, self.head_dim)
        q = apply_rope(q.contiguous(), rope)
        # Query i sits at absolute position start_pos + seqlen - n_q + i and sees the keys up to
        # there: one query (a decoding step, or the last one) sees every key written so far, a
        # prefill from 0 is plainly causal, and only a block of queries after a prefix
        # (self-speculative steps) needs an explicit mask.
        mask, causal = None, False
        if n_q > 1 and start_pos == 0:
            causal = True
        elif n_q > 1:
            key_pos = torch.arange(k.shape[2], device=x.device)
            query_pos = torch.arange(n_q, device=x.device) + start_pos
            mask = key_pos[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=mask, is_causal=causal,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # fmt: skip
        return decode_linear(out.transpose(1, 2).reshape(bsz, n_q, -1), self.wo.weight)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward_decode(self, x: Tensor) -> Tensor:
        """``forward`` with ``decode_linear`` projections (the KV-cache path)."""
        gate = F.silu(decode_linear(x, self.w1.weight)) * decode_linear(x, self.w3.weight)
        return decode_linear(gate, self.w2.weight)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(
        self, x: Tensor, rope: Tensor, start_pos: int | None = None, last_only: bool = False
    ) -> Tensor:
        """The block; with ``start_pos`` on the KV cache, and with ``last_only`` the last
        position's output only (the earlier positions still fill the cache)."""
        if start_pos is not None:
            attended = self.attention(self.attention_norm(x), rope, start_pos, last_only)
            h = (x[:, -1:] if last_only else x) + attended
            return h + self.feed_forward.forward_decode(self.ffn_norm(h))
        h = x + self.attention(self.attention_norm(x), rope)
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
        self._screen: ArgmaxScreen | None = None  # built by greedy_cached, dropped with the caches

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

    def head_hidden(
        self, h_trunk: Tensor, head: int, start_pos: int | None = None, last_only: bool = False
    ) -> Tensor:
        """Output of head block ``head`` (0-based; 0 is next-token) before the final norm; on
        the KV cache (``start_pos``) with ``last_only``, of the last position only."""
        rope = self._positions(start_pos or 0, h_trunk.shape[1])
        if start_pos is not None and last_only:
            return self.head_blocks[head](h_trunk, rope, start_pos, last_only=True)
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
        self._screen = None

    @torch.no_grad()
    def forward_cached(
        self, tokens: Tensor, start_pos: int, n_heads: int = 1, last_only: bool = False
    ) -> Tensor:
        """Logits ``[B, T, n_heads, vocab]`` for ``tokens`` placed at ``start_pos``, extending
        the caches. Earlier positions must already be in the caches of the heads used.
        ``last_only``: logits of the last position only (``T`` = 1), e.g. after a prompt."""
        h = self.trunk(tokens, start_pos)
        h_heads = [self.head_hidden(h, k, start_pos, last_only) for k in range(n_heads)]
        hidden = torch.stack(h_heads, dim=2) if n_heads > 1 else h_heads[0][:, :, None]
        # One call for every head: the output matrix is read once, not once per head. The
        # logits may be a transposed view (``decode_linear``).
        return decode_linear(self.norm(hidden), self.output.weight, pad_one_row=True)

    @torch.no_grad()
    def greedy_cached(self, tokens: Tensor, start_pos: int) -> Tensor:
        """Head 1's greedy token after the last position of ``tokens`` ``[B]``: the argmax of
        ``forward_cached(tokens, start_pos, last_only=True)``, extending the caches alike.

        With fp32 weights and bf16 hardware on a CPU the argmax comes from ``ArgmaxScreen``
        (the same token, a third to a quarter of the output projection's cost); otherwise
        from the logits."""
        h = self.trunk(tokens, start_pos)
        z = self.norm(self.head_hidden(h, 0, start_pos, last_only=True))[:, -1]
        weight = self.output.weight
        if (
            weight.dtype == torch.float32
            and weight.device.type == "cpu"
            and bf16_matmul_is_native()
        ):
            if self._screen is None:
                self._screen = ArgmaxScreen(weight, z.shape[0])
            return self._screen.argmax(z)
        return decode_linear(z, weight, pad_one_row=True).max(-1).indices


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
