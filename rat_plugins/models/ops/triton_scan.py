"""Selective scan in Triton: ViM on a GPU without compiling anything ahead of time.

:func:`selective_scan_triton` has mamba-ssm's ``selective_scan_fn`` semantics (see
:mod:`rat_plugins.models.ops.selective_scan`): delta bias + softplus, D skip, z gate, B / C with or
without groups, ``return_last_state``; float32 / bfloat16 / float16 inputs with a float32 state
(float64 throughout when an input is float64). :func:`bimamba_scan_triton` is the scan of ViM's
bidirectional mixer: both directions in one kernel launch, the backward direction scanned from
the end (no flipped or concatenated copy), their gated outputs summed and scaled in place.

The forward kernel is a parallel scan over chunks of time steps (``tl.associative_scan`` of the
linear recurrence inside a chunk, the state carried between chunks) and, when a gradient is
needed, saves only the state at each chunk start. The backward kernel recomputes a chunk's states
from it and runs the adjoint recurrence as a reverse scan. B / C gradients are summed over the
channels of a group with atomic adds, so they are not bitwise reproducible (as mamba-ssm's).

The kernels are JIT-compiled by Triton on first use (seconds, cached in ``~/.triton``). They run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, slow: how the
tests check them without a GPU; the variable must be set before this module's kernels are imported).
"""

import os
from typing import Optional, Tuple

import torch

__all__ = [
    "selective_scan_triton",
    "bimamba_scan_triton",
    "triton_problem",
    "triton_import_problem",
    "interpreter_enabled",
]

# chunk tiles of about this many [channel, state, step] elements: compiled for sm_90 with 4 warps,
# the backward kernel then needs 168 registers and no spills (2048: 237). Speed is unmeasured.
_TILE_ELEMS = 1024
_MAX_BLOCK_D = 2
_MIN_PROGRAMS = 1024  # fewer channels per program below this many programs (small batches)
_NUM_WARPS = 4
_MAX_STATE = 256

_kernels = None
_import_error: Optional[BaseException] = None
_checked = False


def interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``: on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _load_kernels():
    global _kernels, _import_error, _checked
    if not _checked:
        _checked = True
        try:
            from . import _triton_scan_kernels as kernels
        except Exception as e:  # ImportError, or a Triton that fails at import (driver, version)
            _import_error = e
        else:
            _kernels = kernels
    return _kernels


def triton_import_problem() -> Optional[str]:
    """Why Triton (and with it the kernels) cannot be imported, or None when it can."""
    if _load_kernels() is not None:
        return None
    e = _import_error
    if isinstance(e, ImportError) and (e.name or "").split(".")[0] == "triton":
        return "triton is not installed (pip install triton; CUDA builds of torch bring it)"
    lines = str(e).strip().splitlines()
    return f"triton fails at import ({type(e).__name__}: {lines[0][:160] if lines else '(no message)'})"


def triton_problem(device: Optional[torch.device] = None) -> Optional[str]:
    """Why the Triton scan cannot run on ``device`` (default: CUDA), or None when it can."""
    device = torch.device(device if device is not None else "cuda")
    problem = triton_import_problem()
    if problem is not None:
        return problem
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return None
    if device.type == "cpu" and interpreter_enabled():
        return None
    return f"the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1), got {device.type}"


def _require(device: torch.device):
    problem = triton_problem(device)
    if problem is not None:
        raise RuntimeError(f"selective scan backend 'triton' cannot run: {problem}")
    return _kernels


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _block_sizes(batch: int, dim: int, dim_per_group: int, n_state: int, L: int, ndir: int, chunk: Optional[int]):
    """(BLOCK_D, BLOCK_N, BLOCK_L): channels per program (a power of two dividing the channels of a
    group, so a program reads one group's B / C), states (padded to a power of two), chunk steps."""
    block_n = _next_pow2(n_state)
    block_d = 1
    while block_d < _MAX_BLOCK_D and dim_per_group % (2 * block_d) == 0:
        block_d *= 2
    while block_d > 1 and batch * ndir * (dim // block_d) < _MIN_PROGRAMS:
        block_d //= 2
    if chunk is not None:
        block_l = _next_pow2(max(1, int(chunk)))
    else:
        block_l = max(16, min(128, _TILE_ELEMS // (block_d * block_n)))  # 32 for ViM (d_state 16)
        block_l = min(block_l, max(16, _next_pow2(L)))  # no chunk much longer than the sequence
    return block_d, block_n, block_l


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _tl_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _bc_strides(M: torch.Tensor):
    """(batch, group, state, time) strides of B / C given as [b, state, L] or [b, groups, state, L]."""
    if M.dim() == 3:
        return M.stride(0), 0, M.stride(1), M.stride(2)
    return M.stride(0), M.stride(1), M.stride(2), M.stride(3)


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two directions' tensors share one set of strides in the kernels."""
    if a.stride() == b.stride():
        return a, b
    return a.contiguous(), b.contiguous()


def _flags(D, z, delta_bias, delta_softplus):
    return dict(
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus)
    )


def _forward(us, dls, Bs, Cs, z, A2, D2, bias2, softplus, chunk, need_ck, scale, out_dtype):
    """Launch the forward kernel over ``len(us)`` directions; returns (out, last, checkpoints, blocks)."""
    kernels = _require(us[0].device)
    ndir = len(us)
    u0 = us[0]
    batch, dim, L = u0.shape
    n_state = A2.shape[-1]
    groups = 1 if Bs[0].dim() == 3 else Bs[0].shape[1]
    cdt = _compute_dtype(*us, *dls, *Bs, *Cs, A2)
    block_d, block_n, block_l = _block_sizes(batch, dim, dim // groups, n_state, L, ndir, chunk)
    n_chunks = -(-L // block_l)
    bidir = ndir == 2
    out = (
        torch.zeros(batch, dim, L, device=u0.device, dtype=cdt)
        if bidir
        else torch.empty(batch, dim, L, device=u0.device, dtype=out_dtype)
    )
    last = torch.empty(ndir, batch, dim, n_state, device=u0.device, dtype=cdt)
    ck = torch.empty(ndir, batch, dim, n_chunks if need_ck else 0, n_state, device=u0.device, dtype=cdt)
    if batch * dim * L == 0:
        last.zero_()
        return out.to(out_dtype), last, ck, (block_d, block_n, block_l)
    zz = z if z is not None else u0
    dummy = A2  # stands in for the pointers of absent optional inputs (never read)
    grid = (batch, dim // block_d, ndir)
    kernels.scan_fwd_kernel[grid](
        us[0],
        us[-1],
        dls[0],
        dls[-1],
        Bs[0],
        Bs[-1],
        Cs[0],
        Cs[-1],
        zz,
        A2,
        D2 if D2 is not None else dummy,
        bias2 if bias2 is not None else dummy,
        out,
        last,
        ck,
        dim,
        L,
        n_state,
        dim // groups,
        n_chunks,
        *u0.stride(),
        *dls[0].stride(),
        *_bc_strides(Bs[0]),
        *_bc_strides(Cs[0]),
        *zz.stride(),
        *out.stride(),
        float(scale),
        **_flags(D2, z, bias2, softplus),
        BIDIR=bidir,
        STORE_CK=need_ck,
        STORE_LAST=True,
        COMPUTE=_tl_dtype(cdt),
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        BLOCK_L=block_l,
        num_warps=_NUM_WARPS,
    )
    return out.to(out_dtype) if bidir else out, last, ck, (block_d, block_n, block_l)


def _backward(us, dls, Bs, Cs, z, A2, D2, bias2, softplus, ck, blocks, gout, glast, scale):
    """Launch the backward kernel; returns per-direction gradient tensors (stacked on dim 0)."""
    kernels = _require(us[0].device)
    ndir = len(us)
    u0 = us[0]
    batch, dim, L = u0.shape
    n_state = A2.shape[-1]
    groups = 1 if Bs[0].dim() == 3 else Bs[0].shape[1]
    block_d, block_n, block_l = blocks
    n_chunks = ck.shape[3]
    cdt = ck.dtype
    bidir = ndir == 2
    dev = u0.device
    gu = torch.empty(ndir, batch, dim, L, device=dev, dtype=u0.dtype)
    gdl = torch.empty(ndir, batch, dim, L, device=dev, dtype=dls[0].dtype)
    gB = torch.zeros(ndir, batch, groups, n_state, L, device=dev, dtype=cdt)
    gC = torch.zeros(ndir, batch, groups, n_state, L, device=dev, dtype=cdt)
    gz = None
    if z is not None:
        gz = (
            torch.zeros(batch, dim, L, device=dev, dtype=cdt)
            if bidir
            else torch.empty_like(z, memory_format=torch.contiguous_format)
        )
    gA = torch.empty(ndir, batch, dim, n_state, device=dev, dtype=cdt)
    gD = torch.empty(ndir, batch, dim, device=dev, dtype=cdt) if D2 is not None else None
    gbias = torch.empty(ndir, batch, dim, device=dev, dtype=cdt) if bias2 is not None else None
    if gout is None:
        gout = torch.zeros(batch, dim, L, device=dev, dtype=cdt)
    if batch * dim * L == 0:
        gu.zero_()
        gdl.zero_()
        gA.zero_()
        for t in (gD, gbias, gz):
            if t is not None:
                t.zero_()
    else:
        dummy = A2
        zz = z if z is not None else u0
        grid = (batch, dim // block_d, ndir)
        kernels.scan_bwd_kernel[grid](
            us[0],
            us[-1],
            dls[0],
            dls[-1],
            Bs[0],
            Bs[-1],
            Cs[0],
            Cs[-1],
            zz,
            A2,
            D2 if D2 is not None else dummy,
            bias2 if bias2 is not None else dummy,
            ck,
            gout,
            glast if glast is not None else dummy,
            gu,
            gdl,
            gB,
            gC,
            gz if gz is not None else dummy,
            gA,
            gD if gD is not None else dummy,
            gbias if gbias is not None else dummy,
            dim,
            L,
            n_state,
            dim // groups,
            groups,
            n_chunks,
            *u0.stride(),
            *dls[0].stride(),
            *_bc_strides(Bs[0]),
            *_bc_strides(Cs[0]),
            *zz.stride(),
            *gout.stride(),
            float(scale),
            **_flags(D2, z, bias2, softplus),
            BIDIR=bidir,
            HAS_GLAST=glast is not None,
            COMPUTE=_tl_dtype(cdt),
            BLOCK_D=block_d,
            BLOCK_N=block_n,
            BLOCK_L=block_l,
            num_warps=_NUM_WARPS,
        )
    return gu, gdl, gB, gC, gz, gA.sum(1), None if gD is None else gD.sum(1), None if gbias is None else gbias.sum(1)


class _SelectiveScanTriton(torch.autograd.Function):
    """The whole op of one direction (delta bias + softplus, D skip, z gate included)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        need_grad = any(ctx.needs_input_grad)
        A2, D2, bias2 = A.contiguous()[None], _stacked(D), _stacked(delta_bias)
        out, last, ck, blocks = _forward(
            (u,), (delta,), (B,), (C,), z, A2, D2, bias2, delta_softplus, chunk, need_grad, 1.0, u.dtype
        )
        if need_grad:
            ctx.save_for_backward(u, delta, A2, B, C, D2, z, bias2, ck)
            ctx.delta_softplus, ctx.blocks = delta_softplus, blocks
            ctx.dtypes = tuple(None if t is None else t.dtype for t in (A, B, C, D, z, delta_bias))
        return out, last[0]

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A2, B, C, D2, z, bias2, ck = ctx.saved_tensors
        glast = None if glast is None else glast[None]
        gu, gdl, gB, gC, gz, gA, gD, gbias = _backward(
            (u,), (delta,), (B,), (C,), z, A2, D2, bias2, ctx.delta_softplus, ck, ctx.blocks, gout, glast, 1.0
        )
        A_dt, B_dt, C_dt, D_dt, z_dt, bias_dt = ctx.dtypes
        return (
            gu[0],
            gdl[0],
            _cast(gA[0], A_dt),
            _cast(gB[0].reshape(B.shape), B_dt),
            _cast(gC[0].reshape(C.shape), C_dt),
            _cast(None if gD is None else gD[0], D_dt),
            _cast(gz, z_dt),
            _cast(None if gbias is None else gbias[0], bias_dt),
            None,
            None,
        )


class _BiMambaScanTriton(torch.autograd.Function):
    """scale * (y_0 + y_1) of the two directions of a bimamba v2 mixer, one launch each way."""

    @staticmethod
    def forward(ctx, u0, u1, delta0, delta1, A2, B0, B1, C0, C1, D2, bias2, z, scale, chunk):
        need_grad = any(ctx.needs_input_grad)
        us, dls = _same_layout(u0, u1), _same_layout(delta0, delta1)
        Bs, Cs = _same_layout(B0, B1), _same_layout(C0, C1)
        A2, D2, bias2 = (None if t is None else t.contiguous() for t in (A2, D2, bias2))
        out, _, ck, blocks = _forward(us, dls, Bs, Cs, z, A2, D2, bias2, True, chunk, need_grad, scale, u0.dtype)
        if need_grad:
            ctx.save_for_backward(*us, *dls, *Bs, *Cs, z, A2, D2, bias2, ck)
            ctx.scale, ctx.blocks = scale, blocks
            ctx.dtypes = tuple(None if t is None else t.dtype for t in (A2, B0, C0, D2, z, bias2))
        return out

    @staticmethod
    def backward(ctx, gout):
        u0, u1, dl0, dl1, B0, B1, C0, C1, z, A2, D2, bias2, ck = ctx.saved_tensors
        gu, gdl, gB, gC, gz, gA, gD, gbias = _backward(
            (u0, u1), (dl0, dl1), (B0, B1), (C0, C1), z, A2, D2, bias2, True, ck, ctx.blocks, gout, None, ctx.scale
        )
        A_dt, B_dt, C_dt, D_dt, z_dt, bias_dt = ctx.dtypes
        gB = _cast(gB.reshape(2, *B0.shape), B_dt)
        gC = _cast(gC.reshape(2, *C0.shape), C_dt)
        return (
            gu[0],
            gu[1],
            gdl[0],
            gdl[1],
            _cast(gA, A_dt),
            gB[0],
            gB[1],
            gC[0],
            gC[1],
            _cast(gD, D_dt),
            _cast(gbias, bias_dt),
            _cast(gz, z_dt),
            None,
            None,
        )


def _stacked(v: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if v is None else v.contiguous()[None]


def _cast(grad, dtype):
    return None if grad is None or dtype is None else grad.to(dtype)


def selective_scan_triton(
    u,
    delta,
    A,
    B,
    C,
    D=None,
    z=None,
    delta_bias=None,
    delta_softplus=False,
    return_last_state=False,
    chunk_size: Optional[int] = None,
):
    """mamba-ssm's ``selective_scan_fn`` in Triton (shapes checked by the caller,
    :func:`rat_plugins.models.ops.selective_scan.selective_scan`).

    ``chunk_size``: time steps per chunk, rounded up to a power of two (default: a tile of about
    1024 channel x state x step elements). Results do not depend on it beyond rounding.
    """
    if A.shape[1] > _MAX_STATE:
        raise ValueError(f"the Triton selective scan supports d_state <= {_MAX_STATE}, got {A.shape[1]}")
    out, last = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk_size)
    return (out, last) if return_last_state else out


def bimamba_scan_triton(u, delta, A, B, C, D, delta_bias, z, scale=1.0, chunk_size: Optional[int] = None):
    """``scale * (y_0 + y_1)`` of a bidirectional mixer's two scans, in one launch (and one for
    the backward pass).

    Direction 0 is the causal scan of the sequence, direction 1 the causal scan of the reversed
    sequence, read and written in the original time order: ``y_1[t]`` depends on steps t .. L-1.
    Each direction i: ``y_i = (scan(u[i], softplus(delta[i] + delta_bias[i]), A[i], B[i], C[i]) +
    D[i] u[i]) * silu(z)``.

    Args:
        u, delta, B, C: pairs (direction 0, direction 1) of [batch, dim, L] / [batch, state, L]
            tensors (any strides; the two of a pair get one layout).
        A: [2, dim, state]; D, delta_bias: [2, dim]; z: [batch, dim, L], shared by both.
    Returns:
        [batch, dim, L] in ``u[0]``'s dtype (summed in float32).
    """
    if A.dim() != 3 or A.shape[0] != 2 or A.shape[1] != u[0].shape[1]:
        raise ValueError(f"A must be [2, dim={u[0].shape[1]}, state], got {tuple(A.shape)}")
    if A.shape[2] > _MAX_STATE:
        raise ValueError(f"the Triton selective scan supports d_state <= {_MAX_STATE}, got {A.shape[2]}")
    return _BiMambaScanTriton.apply(*u, *delta, A, *B, *C, D, delta_bias, z, float(scale), chunk_size)
