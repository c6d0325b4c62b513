"""rat_plugins.models.ops.selective_scan against the plain sequential reference (_helpers.reference_scan)."""

import random
import warnings

import pytest
import torch
import torch.nn.functional as F

from rat_plugins.models.ops import selective_scan as ss
from rat_plugins.models.ops.selective_scan import backend_for, selective_scan

from _helpers import reference_scan

# name: (groups (0 = [batch, state, L] B/C), z, delta_softplus, delta_bias, D, return_last_state)
CONFIGS = {
    "plain": (0, False, False, False, False, False),
    "gated_softplus": (0, True, True, True, True, False),
    "grouped_gated_last": (2, True, True, False, True, True),
    "grouped_softplus_last": (2, False, True, True, False, True),
}
SIZES = {1: (2, 6, 5), 7: (2, 6, 5), 196: (2, 4, 4), 1600: (1, 4, 4)}  # L: (batch, dim, state)


def make_inputs(L, cfg, dtype=torch.float32, seed=0):
    groups, use_z, softplus, use_bias, use_D, _ = CONFIGS[cfg]
    batch, dim, state = SIZES.get(L, (2, 4, 4))
    g = torch.Generator().manual_seed(seed + L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc_shape = (batch, groups, state, L) if groups else (batch, state, L)
    x = {
        "u": r(batch, dim, L),
        # raw delta: softplus-ed below when the config asks for it, else already positive
        "delta": r(batch, dim, L) * 0.5 - 1.0 if softplus else F.softplus(r(batch, dim, L) * 0.5 - 1.0),
        "A": -torch.exp(r(dim, state) * 0.5),
        "B": r(*bc_shape),
        "C": r(*bc_shape),
        "D": r(dim) if use_D else None,
        "z": r(batch, dim, L) if use_z else None,
        "delta_bias": r(dim) * 0.3 if use_bias else None,
    }
    return {k: (v.to(dtype) if v is not None else None) for k, v in x.items()}


def run(fn, inputs, cfg, weights):
    """Forward + backward of sum(w * y) (+ sum(w2 * last_state)); returns outputs and grads."""
    softplus, last = CONFIGS[cfg][2], CONFIGS[cfg][5]
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in inputs.items()}
    y, s = fn(leaves, softplus, last)
    loss = (y.double() * weights[0]).sum()
    if last:
        loss = loss + (s.double() * weights[1]).sum()
    loss.backward()
    grads = {k: v.grad for k, v in leaves.items() if v is not None}
    return y, (s if last else None), grads


def ref_fn(x, softplus, last):
    return reference_scan(
        x["u"],
        x["delta"],
        x["A"],
        x["B"],
        x["C"],
        D=x["D"],
        z=x["z"],
        delta_bias=x["delta_bias"],
        delta_softplus=softplus,
    )


def project_fn(backend, chunk):
    def fn(x, softplus, last):
        out = selective_scan(
            x["u"],
            x["delta"],
            x["A"],
            x["B"],
            x["C"],
            D=x["D"],
            z=x["z"],
            delta_bias=x["delta_bias"],
            delta_softplus=softplus,
            return_last_state=last,
            backend=backend,
            chunk_size=chunk,
        )
        return out if last else (out, None)

    return fn


_REF_CACHE = {}


def reference_results(L, cfg):
    key = (L, cfg)
    if key not in _REF_CACHE:
        x64 = make_inputs(L, cfg, torch.float64)
        g = torch.Generator().manual_seed(123 + L)
        batch, dim, state = x64["u"].shape[0], x64["u"].shape[1], x64["A"].shape[1]
        weights = (
            torch.randn(batch, dim, L, generator=g, dtype=torch.float64),
            torch.randn(batch, dim, state, generator=g, dtype=torch.float64),
        )
        _REF_CACHE[key] = (weights, run(ref_fn, x64, cfg, weights))
    return _REF_CACHE[key]


def assert_close(actual, expected, what, rtol=1e-5):
    expected = expected.double()
    # fp32 inputs: relative 1e-5, plus an absolute floor of 1e-5 of the tensor's scale for
    # entries that are sums of terms of both signs (near-zero results of large terms)
    atol = 1e-5 * max(1.0, expected.abs().max().item()) if actual.dtype != torch.float64 else 1e-10
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.double() - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((err <= bound).all()), (
        f"{what}: max excess {(err - bound).max().item():.3g}, max err {err.max().item():.3g}"
    )


def cpu_backends():
    names = ["torch"]
    if ss.load_cpp_extension(strict=False) is not None:
        names.insert(0, "cpp")
    return names


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("L", [1, 7, 196, 1600])
def test_matches_sequential_reference_fp32(backend, cfg, L):
    if backend not in cpu_backends():
        pytest.fail("the C++ selective-scan kernel did not build (g++ is expected on every test machine)")
    weights, (y_ref, s_ref, g_ref) = reference_results(L, cfg)
    rng = random.Random(f"{backend}-{cfg}-{L}")
    chunk = rng.randint(1, min(L, 300))  # random chunk boundaries
    y, s, grads = run(project_fn(backend, chunk), make_inputs(L, cfg), cfg, weights)
    assert y.dtype == torch.float32
    assert_close(y, y_ref, f"y (chunk {chunk})")
    if s_ref is not None:
        assert_close(s, s_ref, f"last_state (chunk {chunk})")
    assert set(grads) == set(g_ref)
    for name in g_ref:
        assert_close(grads[name], g_ref[name], f"d{name} (chunk {chunk})")


@pytest.mark.parametrize("backend", ["cpp", "torch", "torch-small-blocks"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_matches_reference_fp64_tightly(backend, cfg, monkeypatch):
    """In float64 the only differences are rounding: any chunking gives the reference to 1e-10."""
    if backend == "torch-small-blocks":  # several blocks of chunks, chained by their states
        monkeypatch.setattr(ss, "_TORCH_BLOCK_ELEMS", 2 * 4 * 4 * 10)
        backend = "torch"
    if backend not in cpu_backends():
        pytest.fail("the C++ selective-scan kernel did not build (g++ is expected on every test machine)")
    L = 53
    weights, (y_ref, s_ref, g_ref) = reference_results(L, cfg)
    for chunk in (1, 5, 16, 53, 64):
        y, s, grads = run(project_fn(backend, chunk), make_inputs(L, cfg, torch.float64), cfg, weights)
        assert y.dtype == torch.float64
        assert_close(y, y_ref, f"y chunk {chunk}", rtol=1e-10)
        if s_ref is not None:
            assert_close(s, s_ref, f"last_state chunk {chunk}", rtol=1e-10)
        for name in g_ref:
            assert_close(grads[name], g_ref[name], f"d{name} chunk {chunk}", rtol=1e-10)


def test_cpp_gradcheck():
    if "cpp" not in cpu_backends():
        pytest.fail("the C++ selective-scan kernel did not build (g++ is expected on every test machine)")
    x = make_inputs(9, "grouped_gated_last", torch.float64)
    x["delta_bias"] = torch.randn(x["u"].shape[1], dtype=torch.float64)
    names = list(x)
    leaves = [x[k].clone().requires_grad_(True) for k in names]

    def f(*args):
        kw = dict(zip(names, args))
        y, s = selective_scan(
            kw.pop("u"),
            kw.pop("delta"),
            kw.pop("A"),
            kw.pop("B"),
            kw.pop("C"),
            **kw,
            delta_softplus=True,
            return_last_state=True,
            backend="cpp",
            chunk_size=4,
        )
        return y, s

    assert torch.autograd.gradcheck(f, leaves, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("state", [5, 16, 32])  # 16 / 32: the vectorised kernel; others: the generic one
@pytest.mark.parametrize("L", [1, 7, 33, 196])  # 33: gate epilogue of 2 x 16 steps + a 1-step tail
def test_cpp_inference_path_matches_reference(cfg, state, L):
    """Without autograd the C++ backend runs one fused call (exp, recurrence, D skip and z gate)."""
    if "cpp" not in cpu_backends():
        pytest.fail("the C++ selective-scan kernel did not build (g++ is expected on every test machine)")
    groups, use_z, softplus, use_bias, use_D, last = CONFIGS[cfg]
    g = torch.Generator().manual_seed(L * 100 + state)
    batch, dim = 2, 4
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (batch, groups, state, L) if groups else (batch, state, L)
    # without softplus, delta must be >= 0 itself (else exp(delta A) > 1 and the states overflow)
    delta = r(batch, dim, L) * 0.5 - 1 if softplus else r(batch, dim, L).abs() * 0.3
    x = {
        "u": r(batch, dim, L),
        "delta": delta,
        "A": -torch.exp(r(dim, state) * 0.5),
        "B": r(*bc),
        "C": r(*bc),
        "D": r(dim) if use_D else None,
        "z": r(batch, dim, L) if use_z else None,
        "delta_bias": r(dim) * 0.3 if use_bias else None,
    }
    y_ref, s_ref = ref_fn(x, softplus, True)
    for dtype in (torch.float32, torch.float64):
        xt = {k: (v.to(dtype) if v is not None else None) for k, v in x.items()}
        with torch.inference_mode():
            y, s = project_fn("cpp", None)(xt, softplus, True)
        assert y.dtype == dtype
        rtol = 1e-5 if dtype == torch.float32 else 1e-10
        assert_close(y, y_ref, f"y ({dtype}, inference)", rtol=rtol)
        assert_close(s, s_ref, f"last_state ({dtype}, inference)", rtol=rtol)


def test_cpp_inference_softplus_over_its_whole_range():
    """The kernel's own softplus(delta + bias) (log1p trick, threshold 20), read out directly: with
    A = -1e30 every state forgets its past (exp(delta A) = 0), so with u = 1, B = 1, C = 1/16
    the output y_t is delta_t after bias and softplus, from 1e-13 up to 30."""
    L, state, dim = 64, 16, 3  # 64 steps: the 16-wide vector prologue, no scalar tail
    delta = torch.linspace(-30, 30, dim * L).view(1, dim, L)
    bias = torch.tensor([0.0, 0.5, -0.25])
    ones = torch.ones(1, state, L)
    with torch.inference_mode():
        y = selective_scan(
            torch.ones(1, dim, L),
            delta,
            torch.full((dim, state), -1e30),
            ones,
            ones / state,
            delta_bias=bias,
            delta_softplus=True,
            backend="cpp",
        )
    want = F.softplus((delta + bias[:, None]).double())
    torch.testing.assert_close(y.double(), want, rtol=2e-6, atol=0)


def test_output_dtype_and_inference_mode():
    x = make_inputs(20, "gated_softplus")
    for backend in cpu_backends():
        with torch.inference_mode():
            y = selective_scan(
                x["u"].bfloat16(),
                x["delta"],
                x["A"],
                x["B"],
                x["C"],
                x["D"],
                x["z"],
                x["delta_bias"],
                True,
                backend=backend,
            )
        assert y.dtype == torch.bfloat16 and y.shape == x["u"].shape
        y32 = selective_scan(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, backend=backend
        )
        assert y32.grad_fn is None


def test_bad_shapes_raise_value_error():
    x = make_inputs(7, "plain")
    with pytest.raises(ValueError, match="delta shape"):
        selective_scan(x["u"], x["delta"][:, :, :3], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="groups dividing dim"):
        B = x["B"].unsqueeze(1).expand(-1, 4, -1, -1)  # 4 groups do not divide dim 6
        selective_scan(x["u"], x["delta"], x["A"], B, B)
    with pytest.raises(ValueError, match="complex"):
        selective_scan(x["u"], x["delta"], x["A"].to(torch.complex64), x["B"], x["C"])


def test_backend_selection_env(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.setenv(ss.BACKEND_ENV, "torch")
    assert backend_for(x) == "torch"
    monkeypatch.setenv(ss.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="RAT_PLUGINS_SCAN_BACKEND"):
        backend_for(x)
    monkeypatch.setenv(ss.BACKEND_ENV, "auto")
    assert backend_for(x) in ("cpp", "torch")
    assert backend_for() == backend_for(x)
    if "cpp" in cpu_backends():
        monkeypatch.setenv(ss.BACKEND_ENV, "cpp")
        assert backend_for(x) == "cpp"


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(ss, "_ext", None)
    monkeypatch.setattr(ss, "_ext_error", RuntimeError("no compiler (simulated)"))
    monkeypatch.setattr(ss, "_warned", False)
    monkeypatch.delenv(ss.BACKEND_ENV, raising=False)
    x = make_inputs(7, "gated_softplus")
    with pytest.warns(RuntimeWarning, match="simulated"):
        assert backend_for(x["u"]) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True)
    y_ref, _ = reference_scan(
        *(x[k].double() for k in ("u", "delta", "A", "B", "C", "D", "z")),
        delta_bias=x["delta_bias"].double(),
        delta_softplus=True,
    )
    assert_close(y, y_ref, "fallback y")
    monkeypatch.setenv(ss.BACKEND_ENV, "cpp")
    with pytest.raises(RuntimeError, match="could not be built"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference():
    """On CUDA: mamba-ssm's kernel when installed (else the Triton scan, else the torch path)
    against the reference.

    mamba-ssm does not backpropagate through last_state, so gradients use a config without it.
    """
    assert backend_for(torch.zeros(1, device="cuda")) in ("mamba_ssm", "triton", "torch")
    for cfg in ("gated_softplus", "grouped_gated_last"):
        L = 196
        weights, (y_ref, s_ref, g_ref) = reference_results(L, cfg)
        x = {k: (v.cuda() if v is not None else None) for k, v in make_inputs(L, cfg).items()}
        for backend in ("auto", "torch"):
            fn = project_fn(backend, None)
            if s_ref is not None:  # forward only
                with torch.no_grad():
                    y, s = fn(x, True, True)
                assert_close(y.cpu(), y_ref, f"{backend} y", rtol=1e-4)
                assert_close(s.cpu(), s_ref, f"{backend} last_state", rtol=1e-4)
                continue
            y, _, grads = run(fn, x, cfg, tuple(t.cuda() for t in weights))
            assert_close(y.cpu(), y_ref, f"{backend} y", rtol=1e-4)
            for name in g_ref:
                assert_close(grads[name].cpu(), g_ref[name], f"{backend} d{name}", rtol=1e-4)
