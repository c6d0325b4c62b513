"""Selective scan (the Mamba S6 recurrence) that runs anywhere.

``selective_scan`` is a drop-in for mamba-ssm's ``selective_scan_fn`` (same arguments, layouts and
results)::

    delta = softplus(delta + delta_bias)          (bias and softplus optional)
    s_t   = exp(delta_t * A) * s_{t-1} + delta_t * B_t * u_t       (per dim d and state n)
    y_t   = sum_n C_t[n] * s_t[n] + D * u_t
    y     = y * silu(z)                           (if z is given)

Layouts: ``u``, ``delta``, ``z``: [batch, dim, L]; ``A``: [dim, state] (real); ``B``, ``C``:
[batch, state, L] or [batch, groups, state, L] (channel d uses group d // (dim // groups));
``D``, ``delta_bias``: [dim]. Returns ``y`` (dtype of ``u``) or ``(y, last_state)`` [batch, dim, state].

Backends (:func:`backend_for` says which one a tensor gets, :func:`backend_report` why): on CUDA
``mamba_ssm`` (its CUDA kernel, when it imports), else ``triton`` (:mod:`.triton_scan`, JIT-compiled
by Triton on first use), else ``torch``; on CPU ``cpp`` (``csrc/selective_scan.cpp``, compiled on
first use into torch's extension cache; exp(delta A) computed in registers, the backward pass an
adjoint recurrence over chunks of time), else ``torch`` (pure PyTorch, differentiable, any device:
a chunked log-depth scan). ``RAT_PLUGINS_SCAN_BACKEND`` = ``auto`` (default) | ``cpp`` | ``triton``
| ``torch`` | ``mamba_ssm`` (or ``backend=``) chooses; ``auto`` falls back to ``torch`` with one
warning when the C++ kernel cannot be built, an explicit request that cannot be met raises. The
CPU and Triton backends compute in float32 (float64 if any input is).
"""

import logging
import os
import shutil
import threading
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "selective_scan",
    "backend_for",
    "available_backends",
    "backend_report",
    "load_cpp_extension",
    "BACKEND_ENV",
]

logger = logging.getLogger(__name__)

BACKEND_ENV = "RAT_PLUGINS_SCAN_BACKEND"
_REQUESTS = ("auto", "cpp", "triton", "torch", "mamba_ssm")
_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "selective_scan.cpp")
_EXT_NAME = "rat_plugins_selective_scan_cpu"

# C++ path: elements of one [batch, dim, chunk, state] block of exponentials (2 MiB in fp32, so a
# thread's share stays in its L2 cache between the ATen exp and the recurrence)
_CPP_BLOCK_ELEMS = 1 << 19
_TORCH_CHUNK = 8
_TORCH_BLOCK_ELEMS = 1 << 18  # torch path: elements of its [batch, dim, block, state] tensors

_lock = threading.Lock()
_ext = None
_ext_error: Optional[BaseException] = None
_warned = False
_mamba_fn = None
_mamba_error: Optional[BaseException] = None
_mamba_checked = False


# ------------------------------------------------------------------------------------------------
# backend selection


def _mamba_selective_scan_fn():
    """mamba-ssm's ``selective_scan_fn`` or None (imported once, lazily)."""
    global _mamba_fn, _mamba_error, _mamba_checked
    if not _mamba_checked:
        _mamba_checked = True
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        except Exception as e:  # ImportError, or a broken CUDA build raising at import
            selective_scan_fn = None
            _mamba_error = e
        _mamba_fn = selective_scan_fn
    return _mamba_fn


def _cpp_extension_module():
    # importing it logs a CUDA_HOME warning on CUDA builds of torch: irrelevant for a CPU kernel
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _compiler_problem() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler found (`{cxx}` is not on PATH; set CXX or install g++)"
    if not _cpp_extension_module().is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def load_cpp_extension(strict: bool = False):
    """Build (first call only; cached on disk afterwards) and import the C++ CPU kernel.

    Returns the extension module, or None when it cannot be built and ``strict`` is False (a
    warning is emitted once). With ``strict`` a build failure raises RuntimeError.
    """
    global _ext, _ext_error, _warned
    with _lock:
        if _ext is None and _ext_error is None:
            problem = _compiler_problem()
            if problem is not None:
                _ext_error = RuntimeError(problem)
            else:
                try:
                    cpp_extension = _cpp_extension_module()
                    logger.info("building the selective-scan CPU kernel (once; cached in torch's extension dir)")
                    _ext = cpp_extension.load(
                        name=_EXT_NAME,
                        sources=[_SRC],
                        extra_cflags=["-O3", "-fopenmp"],
                        extra_ldflags=["-fopenmp"],
                        verbose=False,
                    )
                except Exception as e:  # compiler errors surface as RuntimeError / CalledProcessError
                    _ext_error = e
        if _ext is None:
            if strict:
                raise RuntimeError(
                    f"the selective-scan C++ kernel could not be built ({_ext_error}); unset "
                    f"{BACKEND_ENV} or set it to 'torch' to use the pure PyTorch scan"
                ) from _ext_error
            if not _warned:
                _warned = True
                warnings.warn(
                    f"selective_scan: C++ CPU kernel unavailable ({_ext_error}); using the pure "
                    "PyTorch chunked scan (slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return _ext


def _requested(backend: Optional[str]) -> str:
    req = (backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")).strip().lower()
    if req == "":
        req = "auto"
    if req not in _REQUESTS:
        src = "backend=" if backend is not None else f"{BACKEND_ENV}="
        raise ValueError(f"{src}{req!r} is not one of {', '.join(_REQUESTS)}")
    return req


def _short(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else '(no message)'}"


def _triton_problem(device: torch.device) -> Optional[str]:
    from .triton_scan import triton_problem

    return triton_problem(device)


def backend_report(device="cpu", backend: Optional[str] = None) -> Tuple[str, str]:
    """``(backend, why)`` for tensors on ``device`` ('cpu' or 'cuda'), as ``python -m rat_plugins
    list`` prints it. Never raises for an unmet request: the reason says what is wrong instead.
    On a machine without CUDA, 'cuda' reports the choice a CUDA device would get here.
    """
    device = torch.device(device)
    try:
        req = _requested(backend)
    except ValueError as e:
        return "none", str(e)
    if device.type != "cuda":
        try:
            name = backend_for(torch.empty(0, device="cpu") if device.type == "cpu" else None, backend)
        except (RuntimeError, ValueError) as e:
            return "none", str(e)
        if name == "cpp":
            return name, "the C++ CPU kernel, built once and cached"
        if name == "triton":
            return name, "requested, running in Triton's interpreter (TRITON_INTERPRET=1)"
        if req == "torch":
            return name, f"requested ({BACKEND_ENV}=torch or backend='torch')"
        return name, f"C++ kernel unavailable: {_ext_error}"
    no_gpu = "" if torch.cuda.is_available() else "; no CUDA device here: what one would get"
    mamba = _mamba_selective_scan_fn()
    mamba_why = "mamba_ssm importable" if mamba is not None else f"mamba_ssm not importable: {_short(_mamba_error)}"
    if torch.cuda.is_available():
        triton_problem = _triton_problem(device)
    else:  # only whether Triton imports: the missing device is said once, above
        from .triton_scan import triton_import_problem

        triton_problem = triton_import_problem()
    if req == "torch":
        return "torch", f"requested ({BACKEND_ENV}=torch or backend='torch')" + no_gpu
    if req == "mamba_ssm":
        return (
            ("mamba_ssm", "requested" + no_gpu.replace("; ", ", ", 1))
            if mamba is not None
            else ("none", f"requested, but {mamba_why}")
        )
    if req == "triton":
        if triton_problem is None:
            return "triton", "requested" + no_gpu.replace("; ", ", ", 1)
        return "none", f"requested, but {triton_problem}"
    if mamba is not None:
        return "mamba_ssm", mamba_why + no_gpu
    if triton_problem is None:
        return "triton", mamba_why + no_gpu
    return "torch", f"{mamba_why}; triton unusable: {triton_problem}" + no_gpu


def backend_for(tensor: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> str:
    """Name of the backend ``selective_scan`` uses for tensors like ``tensor`` (default: CPU).

    One of ``'mamba_ssm'``, ``'triton'``, ``'cpp'``, ``'torch'``. May build the C++ kernel (first
    call only). An explicit request that cannot be met raises (RuntimeError / ValueError).
    """
    device = tensor.device if tensor is not None else torch.device("cpu")
    req = _requested(backend)
    if req == "torch":
        return "torch"
    if req == "triton":
        problem = _triton_problem(device)
        if problem is not None:
            raise RuntimeError(
                f"selective scan backend 'triton' requested ({BACKEND_ENV} or backend=), but {problem}; "
                f"unset {BACKEND_ENV} to let the project choose"
            )
        return "triton"
    if device.type == "cuda":
        if _mamba_selective_scan_fn() is not None:
            return "mamba_ssm"
        if req == "mamba_ssm":
            raise RuntimeError(
                "backend 'mamba_ssm' requested but mamba_ssm cannot be imported "
                "(on a CUDA machine: `pip install -e .[cuda]`)"
            )
        return "triton" if _triton_problem(device) is None else "torch"
    if req == "mamba_ssm":
        raise ValueError(f"backend 'mamba_ssm' needs CUDA tensors, got a {device.type} tensor")
    if device.type != "cpu":
        return "torch"
    if req == "cpp":
        load_cpp_extension(strict=True)
        return "cpp"
    return "cpp" if load_cpp_extension(strict=False) is not None else "torch"


def available_backends() -> dict:
    """``{backend: available?}`` for a quick report (builds the C++ kernel if needed)."""
    cuda = torch.cuda.is_available()
    return {
        "mamba_ssm": _mamba_selective_scan_fn() is not None and cuda,
        "triton": cuda and _triton_problem(torch.device("cuda")) is None,
        "cpp": load_cpp_extension(strict=False) is not None,
        "torch": True,
    }


# ------------------------------------------------------------------------------------------------
# shared helpers


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be [batch, dim, L], got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta shape {tuple(delta.shape)} != u shape {tuple(u.shape)}")
    if A.is_complex():
        raise ValueError("complex A is not supported by this selective_scan (real A only)")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be [dim={dim}, state], got {tuple(A.shape)}")
    N = A.shape[1]
    groups = []
    for name, M in (("B", B), ("C", C)):
        if M.dim() == 3 and M.shape == (batch, N, L):
            groups.append(1)
        elif (
            M.dim() == 4 and M.shape[0] == batch and M.shape[2:] == (N, L) and M.shape[1] > 0 and dim % M.shape[1] == 0
        ):
            groups.append(M.shape[1])
        else:
            raise ValueError(
                f"{name} must be [batch={batch}, state={N}, L={L}] or [batch, groups, state, L] with "
                f"groups dividing dim={dim}; got {tuple(M.shape)}"
            )
    if groups[0] != groups[1]:
        raise ValueError(f"B and C must have the same number of groups, got {groups[0]} and {groups[1]}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z shape {tuple(z.shape)} != u shape {tuple(u.shape)}")
    for name, v in (("D", D), ("delta_bias", delta_bias)):
        if v is not None and tuple(v.shape) != (dim,):
            raise ValueError(f"{name} must be [dim={dim}], got {tuple(v.shape)}")


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _as_groups(M: torch.Tensor) -> torch.Tensor:
    return M.unsqueeze(1) if M.dim() == 3 else M


def _process_delta(delta, delta_bias, delta_softplus, dtype):
    d = delta.to(dtype)
    if delta_bias is not None:
        d = d + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        d = F.softplus(d)
    return d


def _cpp_chunk(batch: int, dim: int, state: int, L: int, chunk_size: Optional[int]) -> int:
    if chunk_size is not None:
        return max(1, int(chunk_size))
    return max(16, min(max(L, 1), _CPP_BLOCK_ELEMS // max(1, batch * dim * state)))


# ------------------------------------------------------------------------------------------------
# C++ backend


def _exp_block(buf: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, t0: int, T: int) -> torch.Tensor:
    """exp(delta[:, :, t0:t0+T, None] * A[:, None, :]) written into (a prefix of) ``buf``."""
    b, d, _ = delta.shape
    n = A.shape[1]
    out = buf.view(-1)[: b * d * T * n].view(b, d, T, n)
    torch.mul(delta[:, :, t0 : t0 + T, None], A[:, None, :], out=out)
    return out.exp_()


def _cpp_forward(ext, u, delta, A, Bt, Ct, chunk):
    """The fused kernel over chunks of ``chunk`` steps, keeping the state at each chunk start for
    the backward pass."""
    b, d, L = u.shape
    n = A.shape[1]
    state = u.new_zeros(b, d, n)
    y = torch.empty_like(u)
    checkpoints = []
    for t0 in range(0, L, chunk):
        checkpoints.append(state.clone())
        ext.scan_fwd_fused(A, delta, u, Bt, Ct, state, y, t0, min(chunk, L - t0))
    ck = torch.stack(checkpoints) if checkpoints else u.new_zeros(0, b, d, n)
    return y, state, ck


def _cpp_forward_fused(ext, u, delta, A, Bt, Ct, D, z, delta_bias, delta_softplus):
    """Forward without a backward pass: one kernel call that also applies softplus(delta + bias)
    before the recurrence and ``(y + D u) * silu(z)`` after it."""
    b, d, L = u.shape
    state = u.new_zeros(b, d, A.shape[1])
    y = torch.empty_like(u)
    if L:
        ext.scan_fwd_fused(A, delta, u, Bt, Ct, state, y, 0, L, D, z, delta_bias, bool(delta_softplus))
    return y, state


class _SelectiveScanCpp(torch.autograd.Function):
    """Forward / backward of the whole op (delta bias + softplus, D skip, z gate included)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
        ext = load_cpp_extension(strict=True)
        cdt = _compute_dtype(u, delta, A, B, C)
        uf = u.to(cdt).contiguous()
        Af = A.to(cdt).contiguous()
        Bt = _as_groups(B).to(cdt).transpose(-1, -2).contiguous()  # [b, g, L, n]
        Ct = _as_groups(C).to(cdt).transpose(-1, -2).contiguous()
        needs_grad = any(ctx.needs_input_grad)
        if not needs_grad:  # inference: one kernel call, delta bias + softplus, D skip and z gate inside
            opt = [t.to(cdt).contiguous() if t is not None else None for t in (D, z, delta_bias)]
            out, last = _cpp_forward_fused(ext, uf, delta.to(cdt).contiguous(), Af, Bt, Ct, *opt, delta_softplus)
            return out.to(u.dtype), last
        dlt = _process_delta(delta, delta_bias, delta_softplus, cdt).contiguous()
        y, last, checkpoints = _cpp_forward(ext, uf, dlt, Af, Bt, Ct, chunk)
        if D is not None:
            y = y + D.to(cdt)[:, None] * uf
        out = y * F.silu(z.to(cdt)) if z is not None else y
        if needs_grad:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, checkpoints, y if z is not None else None)
            ctx.delta_softplus = delta_softplus
            ctx.chunk = chunk
            ctx.cdt = cdt
        return out.to(u.dtype), last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, A, B, C, D, z, delta_bias, checkpoints, y = ctx.saved_tensors
        ext = load_cpp_extension(strict=True)
        cdt, chunk = ctx.cdt, ctx.chunk
        uf = u.to(cdt).contiguous()
        dlt = _process_delta(delta, delta_bias, ctx.delta_softplus, cdt).contiguous()
        Af = A.to(cdt).contiguous()
        Bt = _as_groups(B).to(cdt).transpose(-1, -2).contiguous()
        Ct = _as_groups(C).to(cdt).transpose(-1, -2).contiguous()
        b, d, L = uf.shape
        n, g = Af.shape[1], Bt.shape[1]

        gout = gout.to(cdt) if gout is not None else uf.new_zeros(b, d, L)
        gz = None
        if z is not None:
            zf = z.to(cdt)
            sig = torch.sigmoid(zf)
            gy = (gout * zf * sig).contiguous()
            gz = gout * y * (sig * (1 + zf * (1 - sig)))
        else:
            gy = gout.contiguous()

        h = glast.to(cdt).contiguous().clone() if glast is not None else uf.new_zeros(b, d, n)
        gA_part = uf.new_zeros(b, d, n)
        gdelta = torch.empty_like(dlt)
        gu = torch.empty_like(uf)
        gBt = uf.new_empty(b, g, L, n)
        gCt = uf.new_empty(b, g, L, n)
        du = (dlt * uf).contiguous()
        Tmax = min(chunk, L)
        buf = uf.new_empty(b * d * Tmax * n)
        S_buf = uf.new_empty(b * d * Tmax * n)
        H_buf = uf.new_empty(b * d * Tmax * n)
        starts = list(range(0, L, chunk))
        for ci in reversed(range(len(starts))):
            t0 = starts[ci]
            T = min(chunk, L - t0)
            dA = _exp_block(buf, dlt, Af, t0, T)
            S = S_buf[: b * d * T * n].view(b, d, T, n)
            H = H_buf[: b * d * T * n].view(b, d, T, n)
            ext.scan_bwd_chunk(
                dA, dlt, uf, Bt, Ct, Af, gy, checkpoints[ci].contiguous(), h, gA_part, gdelta, gu, S, H, t0
            )
            ext.reduce_over_dim(S, gy, gCt, t0)
            ext.reduce_over_dim(H, du, gBt, t0)

        gD = None
        if D is not None:
            gD = (gy * uf).sum((0, 2))
            gu = gu + D.to(cdt)[:, None] * gy
        if ctx.delta_softplus:
            pre = delta.to(cdt) if delta_bias is None else delta.to(cdt) + delta_bias.to(cdt)[:, None]
            gdelta = gdelta * torch.sigmoid(pre)
        gbias = gdelta.sum((0, 2)) if delta_bias is not None else None
        gB = gBt.transpose(-1, -2)
        gC = gCt.transpose(-1, -2)
        if B.dim() == 3:
            gB = gB.squeeze(1)
        if C.dim() == 3:
            gC = gC.squeeze(1)

        def cast(gr, like):
            return None if gr is None or like is None else gr.to(like.dtype)

        return (
            cast(gu, u),
            cast(gdelta, delta),
            cast(gA_part.sum(0), A),
            cast(gB, B),
            cast(gC, C),
            cast(gD, D),
            cast(gz, z),
            cast(gbias, delta_bias),
            None,
            None,
        )


# ------------------------------------------------------------------------------------------------
# pure PyTorch backend


def _scan_torch_core(u, delta, A, B4, C4, chunk, block_elems=None):
    """Chunked log-depth scan; returns (y without D / z, last_state).

    Time is cut into chunks of ``chunk`` steps. Inside every chunk the pairs (a, x) = (exp(delta A),
    delta u B) are combined by an inclusive Hillis-Steele scan under (a1, x1) o (a2, x2) =
    (a1 a2, a2 x1 + x2), all chunks of a block at once; this yields each chunk's prefix products
    of decays and its zero-start states. A short loop over chunks then chains the chunk-start
    states, and states = zero-start states + prefix products * chunk-start state. Only products
    of decays appear (no division, no exp of a positive number), so this is as stable as the
    sequential recurrence. Blocks of chunks (about ``block_elems`` elements) bound the memory.
    """
    b, d, L = u.shape
    n, g = A.shape[1], B4.shape[1]
    dg = d // g
    T = max(1, int(chunk))
    block_elems = block_elems or _TORCH_BLOCK_ELEMS
    span = max(T, (block_elems // max(1, b * d * n)) // T * T)  # time steps per block, multiple of T
    Bt = B4.transpose(-1, -2)  # [b, g, L, n]
    Ct = C4.transpose(-1, -2)
    s = u.new_zeros(b, d, n)
    ys = []
    for t0 in range(0, L, span):
        Lb = min(span, L - t0)
        nc = -(-Lb // T)
        pad = nc * T - Lb
        dl = delta[:, :, t0 : t0 + Lb]
        a = torch.exp(dl.unsqueeze(-1) * A[:, None, :])  # [b, d, Lb, n]
        x = ((dl * u[:, :, t0 : t0 + Lb]).view(b, g, dg, Lb, 1) * Bt[:, :, None, t0 : t0 + Lb, :]).reshape(b, d, Lb, n)
        if pad:  # identity steps: decay 1, input 0
            a = F.pad(a, (0, 0, 0, pad), value=1.0)
            x = F.pad(x, (0, 0, 0, pad))
        a = a.view(b, d, nc, T, n)
        x = x.view(b, d, nc, T, n)
        k = 1
        while k < T:
            x = torch.cat([x[:, :, :, :k], x[:, :, :, k:] + a[:, :, :, k:] * x[:, :, :, :-k]], dim=3)
            a = torch.cat([a[:, :, :, :k], a[:, :, :, k:] * a[:, :, :, :-k]], dim=3)
            k *= 2
        a_end, x_end = a[:, :, :, -1], x[:, :, :, -1]  # [b, d, nc, n]
        starts = []
        for c in range(nc):
            starts.append(s)
            s = a_end[:, :, c] * s + x_end[:, :, c]
        states = x + a * torch.stack(starts, dim=2).unsqueeze(3)  # [b, d, nc, T, n]
        states = states.view(b, d, nc * T, n)[:, :, :Lb]
        y = (states.reshape(b, g, dg, Lb, n) * Ct[:, :, None, t0 : t0 + Lb, :]).sum(-1)
        ys.append(y.reshape(b, d, Lb))
    y = torch.cat(ys, dim=2) if len(ys) != 1 else ys[0]
    if not ys:
        y = u.new_zeros(b, d, 0)
    return y, s


def _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    cdt = _compute_dtype(u, delta, A, B, C)
    uf = u.to(cdt)
    dlt = _process_delta(delta, delta_bias, delta_softplus, cdt)
    y, last = _scan_torch_core(uf, dlt, A.to(cdt), _as_groups(B).to(cdt), _as_groups(C).to(cdt), chunk)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uf
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), last


# ------------------------------------------------------------------------------------------------
# public entry point


def selective_scan(
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
    *,
    backend: Optional[str] = None,
    chunk_size: Optional[int] = None,
):
    """Selective scan with mamba-ssm's ``selective_scan_fn`` signature (see the module docstring).

    Args:
        u, delta: [batch, dim, L] input and step sizes.
        A: [dim, state] real state matrix (diagonal per channel).
        B, C: [batch, state, L] or [batch, groups, state, L] input-dependent projections.
        D: optional [dim] skip weight. z: optional [batch, dim, L] gate (y * silu(z)).
        delta_bias: optional [dim] added to delta. delta_softplus: apply softplus to delta.
        return_last_state: also return the final state [batch, dim, state].
        backend: override ``RAT_PLUGINS_SCAN_BACKEND`` ('auto' | 'cpp' | 'triton' | 'torch' |
            'mamba_ssm').
        chunk_size: time steps per chunk of the project's backends (default: memory-bounded for
            ``cpp``, 8 for ``torch``, a 1024-element tile for ``triton``, which rounds it up to a
            power of two); results do not depend on it beyond rounding.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    name = backend_for(u, backend)
    if name == "mamba_ssm":
        return _mamba_selective_scan_fn()(
            u,
            delta,
            A,
            B,
            C,
            D=D,
            z=z,
            delta_bias=delta_bias,
            delta_softplus=delta_softplus,
            return_last_state=return_last_state,
        )
    if name == "triton" and A.shape[1] > 256:  # a [channel, state, step] tile per chunk: too large
        name = "torch"
    if name == "triton":
        from .triton_scan import selective_scan_triton

        return selective_scan_triton(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size=chunk_size
        )
    batch, dim, L = u.shape
    if name == "cpp" and A.shape[1] > 256:  # the C++ kernel keeps the state on the stack
        name = "torch"
    if name == "cpp":
        chunk = _cpp_chunk(batch, dim, A.shape[1], L, chunk_size)
        out, last = _SelectiveScanCpp.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), chunk)
    else:
        chunk = max(1, int(chunk_size)) if chunk_size is not None else _TORCH_CHUNK
        out, last = _selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk)
    return (out, last) if return_last_state else out
