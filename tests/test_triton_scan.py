"""The Triton selective scan (rat_plugins.models.ops.triton_scan) against a sequential float64
reference (_helpers.reference_scan), and the fused bimamba v2 mixer on it against the unfused mixer.

Without a GPU the kernels run in Triton's interpreter. ``TRITON_INTERPRET`` is read when kernels
are decorated, so it must never be set in the pytest process (it would change every later test's
Triton): one child process (this file run as a script) computes every case with it set and saves
the results; the tests here compare them with the reference. Tests marked ``gpu`` repeat the
comparisons on CUDA at ViM-tiny's real shapes.
"""

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rat_plugins.models.ops import selective_scan as ss, triton_scan

from _helpers import reference_scan

REPO = Path(__file__).resolve().parents[1]


# options: (groups (0 = [batch, state, L] B / C), z, delta_softplus, delta_bias, D, return_last_state)
OPTIONS = {
    "plain": (0, False, False, False, False, False),
    "gated_softplus": (0, True, True, True, True, False),
    "grouped_gated_last": (2, True, True, False, True, True),
    "grouped_softplus_last": (2, False, True, True, False, True),
    "last_only": (0, False, False, False, False, True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
# relative tolerance per input dtype (bf16 / fp16: outputs and input gradients are stored rounded)
TOLERANCE = {"fp32": 2e-5, "bf16": 2e-2, "fp16": 4e-3, "fp64": 1e-10}


def _case(opts, L, state, dtype="fp32", chunk=8, batch=2, dim=4):
    return dict(opts=opts, L=L, state=state, dtype=dtype, chunk=chunk, batch=batch, dim=dim)


# L = 1, a chunk's worth, L not a multiple of the chunk, several chunks; d_state 1 / 5 / 16; dtypes
CASES = {}
for _opts in OPTIONS:
    for _L in (1, 8, 21):
        CASES[f"{_opts}-L{_L}"] = _case(_opts, _L, 5)
for _state in (1, 16):
    CASES[f"gated_softplus-state{_state}"] = _case("gated_softplus", 13, _state)
for _dt in ("bf16", "fp16", "fp64"):
    for _opts in ("gated_softplus", "grouped_gated_last"):
        CASES[f"{_opts}-{_dt}"] = _case(_opts, 21, 4, _dt)
CASES["gated_softplus-default-chunk"] = _case("gated_softplus", 40, 4, chunk=None)  # one 64-step chunk
CASES["grouped_gated_last-odd-groups"] = _case("grouped_gated_last", 11, 3, dim=6)  # 3 channels a group

MIXERS = {  # fused bimamba v2 (Triton) vs the unfused mixer (torch scan): (dtype, L, BiMambaV2 kwargs)
    "mixer-fp32": ("fp32", 11, {}),
    "mixer-fp64-no-divide-layer-scale": ("fp64", 19, {"if_divide_out": False, "init_layer_scale": 0.5}),
    "mixer-fp64-no-conv-bias-L1": ("fp64", 1, {"conv_bias": False}),
}


def make_inputs(case, device="cpu"):
    """Inputs (rounded to the case's dtype) and loss weights, the same in every process."""
    groups, use_z, softplus, use_bias, use_D, _ = OPTIONS[case["opts"]]
    batch, dim, L, state = case["batch"], case["dim"], case["L"], case["state"]
    g = torch.Generator().manual_seed(1000 * L + 10 * state + dim)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bc = (batch, groups, state, L) if groups else (batch, state, L)
    x = {
        "u": r(batch, dim, L),
        # raw delta: softplus-ed by the op when asked, else already positive (decays <= 1)
        "delta": r(batch, dim, L) * 0.5 - 1.0 if softplus else F.softplus(r(batch, dim, L) * 0.5 - 1.0),
        "A": -torch.exp(r(dim, state) * 0.5),
        "B": r(*bc),
        "C": r(*bc),
        "D": r(dim) if use_D else None,
        "z": r(batch, dim, L) if use_z else None,
        "delta_bias": r(dim) * 0.3 if use_bias else None,
    }
    dtype = DTYPES[case["dtype"]]
    # A, D and delta_bias stay float32 for low-precision inputs, as in ViM (parameters in fp32)
    keep32 = ("A", "D", "delta_bias") if dtype in (torch.bfloat16, torch.float16) else ()
    x = {k: None if v is None else v.to(torch.float32 if k in keep32 else dtype).to(device) for k, v in x.items()}
    weights = (r(batch, dim, L).to(device), r(batch, dim, state).to(device))
    return x, weights


def run_case(case, fn):
    """Forward and backward of sum(w * y) (+ sum(w2 * last_state)); (y, last, {name: grad})."""
    _, _, softplus, _, _, last = OPTIONS[case["opts"]]
    x, weights = make_inputs(case)
    return _run(fn, x, weights, softplus, last)


def _run(fn, x, weights, softplus, last):
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None) for k, v in x.items()}
    y, s = fn(leaves, softplus, last)
    loss = (y.double() * weights[0]).sum()
    if last:
        loss = loss + (s.double() * weights[1]).sum()
    loss.backward()
    return y.detach(), (s.detach() if last else None), {k: v.grad for k, v in leaves.items() if v is not None}


def reference_fn(x, softplus, last):
    x = {k: None if v is None else v.double() for k, v in x.items()}
    return reference_scan(**x, delta_softplus=softplus)


def triton_fn(chunk):
    def fn(x, softplus, last):
        out = ss.selective_scan(
            **x, delta_softplus=softplus, return_last_state=last, backend="triton", chunk_size=chunk
        )
        return out if last else (out, None)

    return fn


def assert_close(actual, expected, what, tol):
    expected = expected.double()
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = (actual.double() - expected).abs()
    # relative tol, plus an absolute floor of tol times the tensor's scale for entries that are
    # sums of terms of both signs (near-zero results of large terms)
    bound = tol * max(1.0, expected.abs().max().item()) + tol * expected.abs()
    assert bool((err <= bound).all()), f"{what}: max excess {(err - bound).max().item():.3g}, max err {err.max():.3g}"


def compare_with_reference(case, result, tol=None, device="cpu"):
    _, _, softplus, _, _, last = OPTIONS[case["opts"]]
    x, weights = make_inputs(case, device)
    y_ref, s_ref, g_ref = _run(reference_fn, x, weights, softplus, last)
    y, s, grads = result
    tol = tol or TOLERANCE[case["dtype"]]
    assert y.dtype == x["u"].dtype
    assert_close(y, y_ref, "y", tol)
    if last:
        assert_close(s, s_ref, "last_state", tol)
    assert set(grads) == set(g_ref)
    for name, g in g_ref.items():
        assert grads[name].dtype == x[name].dtype, name
        assert_close(grads[name], g, f"d{name}", tol)


def make_mixer(dtype, kwargs, d_model=8, device="cpu"):
    from rat_plugins.models.vim import BiMambaV2

    torch.manual_seed(0)
    mixer = BiMambaV2(d_model=d_model, d_state=4, **kwargs).to(device=device, dtype=DTYPES[dtype])
    with torch.no_grad():  # away from the init's zeros and ones, as a trained mixer
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return mixer


def mixer_results(mixer, h, w, fused):
    from rat_plugins.models.ops.bimamba_fused import FusedBiMambaTriton

    h = h.clone().requires_grad_(True)
    out = FusedBiMambaTriton()(mixer, h) if fused else mixer(h)
    params = [h] + list(mixer.parameters())
    return out.detach(), torch.autograd.grad((out.double() * w).sum(), params)


def compute_all(path):
    """The child process: every case through the interpreted kernels, saved to ``path``."""
    assert triton_scan.interpreter_enabled(), "run with TRITON_INTERPRET=1"
    results = {name: run_case(case, triton_fn(case["chunk"])) for name, case in CASES.items()}
    os.environ[ss.BACKEND_ENV] = "torch"  # the unfused mixer: the pure PyTorch scan
    for name, (dtype, L, kwargs) in MIXERS.items():
        mixer = make_mixer(dtype, kwargs)
        g = torch.Generator().manual_seed(L)
        h = torch.randn(2, L, 8, generator=g, dtype=torch.float64).to(DTYPES[dtype])
        w = torch.randn(2, L, 8, generator=g, dtype=torch.float64)
        results[name] = (mixer_results(mixer, h, w, True), mixer_results(mixer, h, w, False))
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Results of every case computed by the kernels in Triton's interpreter (one child process)."""
    if triton_scan.triton_import_problem() is not None:
        pytest.fail(f"Triton is expected on every test machine: {triton_scan.triton_import_problem()}")
    path = tmp_path_factory.mktemp("triton_interpreter") / "results.pt"
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    env.pop(ss.BACKEND_ENV, None)
    proc = subprocess.run(
        [sys.executable, __file__, str(path)], env=env, capture_output=True, text=True, timeout=900, cwd=REPO
    )
    if proc.returncode != 0:
        pytest.fail(f"the interpreter run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_scan_matches_sequential_reference(interpreted, name):
    compare_with_reference(CASES[name], interpreted[name])


@pytest.mark.parametrize("name", list(MIXERS))
def test_interpreted_fused_mixer_matches_unfused(interpreted, name):
    (out_f, grads_f), (out_u, grads_u) = interpreted[name]
    tol = 1e-10 if MIXERS[name][0] == "fp64" else 2e-5
    assert out_f.dtype == out_u.dtype
    assert_close(out_f, out_u, "mixer output", tol)
    assert len(grads_f) == len(grads_u)
    for i, (gf, gu) in enumerate(zip(grads_f, grads_u)):
        assert_close(gf, gu, "input grad" if i == 0 else f"parameter {i - 1} grad", tol)


# ------------------------------------------------------------------------------------------------
# backend choice and errors (no kernel runs)


def fake_cuda_tensor():
    return types.SimpleNamespace(device=torch.device("cuda"))  # backend_for reads only .device


def test_backend_order_on_cuda(monkeypatch):
    """mamba_ssm when importable (unless the env says otherwise), else triton, else torch."""
    monkeypatch.delenv(ss.BACKEND_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ss, "_mamba_selective_scan_fn", lambda: object())
    assert ss.backend_for(fake_cuda_tensor()) == "mamba_ssm"
    assert ss.backend_report("cuda")[0] == "mamba_ssm"
    for request in ("triton", "torch"):
        monkeypatch.setenv(ss.BACKEND_ENV, request)
        assert ss.backend_for(fake_cuda_tensor()) == request
    monkeypatch.delenv(ss.BACKEND_ENV)
    monkeypatch.setattr(ss, "_mamba_selective_scan_fn", lambda: None)
    monkeypatch.setattr(ss, "_mamba_error", ImportError("No module named 'mamba_ssm'"))
    assert ss.backend_for(fake_cuda_tensor()) == "triton"
    name, why = ss.backend_report("cuda")
    assert name == "triton" and "mamba_ssm not importable: ImportError: No module named 'mamba_ssm'" in why
    monkeypatch.setattr(ss, "_triton_problem", lambda device: "triton is not installed (simulated)")
    assert ss.backend_for(fake_cuda_tensor()) == "torch"
    with pytest.raises(RuntimeError, match=r"'triton' requested .*not installed \(simulated\)"):
        ss.backend_for(fake_cuda_tensor(), "triton")


def test_explicit_triton_request_without_usable_triton_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match="run on CUDA tensors"):
        ss.selective_scan(x, x, torch.zeros(2, 1), x[:, :1], x[:, :1], backend="triton")
    monkeypatch.setenv(ss.BACKEND_ENV, "triton")
    assert ss.backend_report("cpu")[0] == "none"
    # Triton missing altogether: the one error says so and how to get it
    err = ImportError("No module named 'triton'", name="triton")
    monkeypatch.setattr(triton_scan, "_checked", True)
    monkeypatch.setattr(triton_scan, "_kernels", None)
    monkeypatch.setattr(triton_scan, "_import_error", err)
    with pytest.raises(RuntimeError, match=r"triton is not installed \(pip install triton"):
        ss.backend_for(fake_cuda_tensor())
    monkeypatch.setenv(ss.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="auto, cpp, triton, torch, mamba_ssm"):
        ss.backend_for(x)


def test_list_reports_both_devices(capsys):
    from rat_plugins.__main__ import list_components

    assert list_components() == 0
    lines = capsys.readouterr().out.splitlines()
    cuda = [ln for ln in lines if ln.startswith("selective scan backend on CUDA: ")]
    cpu = [ln for ln in lines if ln.startswith("selective scan backend on CPU: ")]
    assert len(cuda) == 1 and len(cpu) == 1, lines
    assert cuda[0].split(": ", 1)[1].split(" ")[0] in ("mamba_ssm", "triton", "torch")
    assert "(" in cuda[0] and "(" in cpu[0]  # and why


def test_kernels_compile_for_a_gpu_without_spills():
    """The compiled (not interpreted) kernels at ViM's configuration build for sm_90 and keep their
    tiles in registers: ptxas reports no spills. Needs no GPU (Triton ships ptxas)."""
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from rat_plugins.models.ops import _triton_scan_kernels as kernels

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    assert ptxas.is_file(), f"Triton's ptxas is missing at {ptxas}"
    block_d, block_n, block_l = triton_scan._block_sizes(8, 384, 384, 16, 1601, 2, None)
    assert (block_d, block_n, block_l) == (2, 16, 32)
    for fn, extra in (
        (kernels.scan_fwd_kernel, dict(STORE_CK=True, STORE_LAST=True)),
        (kernels.scan_bwd_kernel, dict(HAS_GLAST=False)),
    ):
        consts = dict(
            HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, BIDIR=True, COMPUTE=tl.float32,
            BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l, **extra,
        )  # fmt: skip
        bf16 = {"u0", "u1", "dl0", "dl1", "B0", "B1", "C0", "C1", "z_ptr", "gout_ptr", "gu_ptr", "gdl_ptr"}
        signature = {}
        for arg in fn.arg_names:
            if arg in consts:
                signature[arg] = "constexpr"
            elif arg.endswith("_ptr") or re.fullmatch(r"(u|dl|B|C)[01]", arg):
                signature[arg] = "*bf16" if arg in bf16 else "*fp32"
            else:
                signature[arg] = "fp32" if arg == "scale" else "i32"
        compiled = triton.compile(
            ASTSource(fn=fn, signature=signature, constexprs=consts),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=triton_scan._NUM_WARPS),
        )
        ptx = Path(os.environ.get("TMPDIR", "/tmp")) / f"rat_plugins_{fn.__name__}_{os.getpid()}.ptx"
        ptx.write_text(compiled.asm["ptx"])
        try:
            proc = subprocess.run(
                [str(ptxas), "-v", "--gpu-name=sm_90a", str(ptx), "-o", os.devnull], capture_output=True, text=True
            )
        finally:
            ptx.unlink()
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "0 bytes spill stores" in proc.stderr, proc.stderr[-2000:]


def test_gpu_pieces_import_without_the_frameworks():
    """The benchmark's imports pull in neither mmcv / mmengine nor detectron2."""
    code = (
        "import sys; import rat_plugins.models.vim, rat_plugins.models.ops.triton_scan; "
        "import rat_plugins.models.ops._triton_scan_kernels; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('mmcv', 'mmengine', 'mmdet', 'mmseg', 'detectron2')]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_gpu_benchmark_without_cuda_says_so_in_one_line():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_vim_gpu.py"), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(proc.stderr.strip().splitlines()) == 1 and "CUDA" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# on a GPU: ViM-tiny's real shapes (inner width 384 per direction, d_state 16)

VIM_SHAPES = [(L, dt) for L in (197, 1601) for dt in ("fp32", "bf16")]


@pytest.mark.gpu
@pytest.mark.parametrize("L,dtype", VIM_SHAPES)
def test_gpu_scan_matches_reference_at_vim_shapes(L, dtype):
    for opts in ("gated_softplus", "grouped_gated_last"):
        case = _case(opts, L, 16, dtype, chunk=None, batch=2, dim=384 if opts == "gated_softplus" else 768)
        _, _, softplus, _, _, last = OPTIONS[opts]
        x, weights = make_inputs(case, "cuda")
        result = _run(triton_fn(None), x, weights, softplus, last)
        # GPU exp / division are approximate (about 2^-22 relative): fp32 to 1e-4
        compare_with_reference(case, result, tol=1e-4 if dtype == "fp32" else None, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("L", [197, 1601])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gpu_fused_mixer_matches_unfused_at_vim_tiny_shapes(L, dtype, monkeypatch):
    from rat_plugins.models.ops.bimamba_fused import FusedBiMambaTriton

    mixer = make_mixer("fp32", {}, d_model=192, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(L)
    h = torch.randn(2, L, 192, device="cuda", generator=g)
    w = torch.randn(2, L, 192, device="cuda", generator=g, dtype=torch.float64)
    monkeypatch.delenv(ss.BACKEND_ENV, raising=False)
    assert FusedBiMambaTriton.applies(mixer, h) == (ss.backend_for(h) == "triton")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        fused = mixer_results(mixer, h, w, True)
        monkeypatch.setenv(ss.BACKEND_ENV, "torch")
        plain = mixer_results(mixer, h, w, False)
    tol = 2e-2 if dtype == "bf16" else 1e-4
    assert_close(fused[0], plain[0], "mixer output", tol)
    for i, (gf, gu) in enumerate(zip(fused[1], plain[1])):
        assert_close(gf, gu, f"grad {i}", tol)


@pytest.mark.gpu
def test_gpu_vim_tiny_backbone_triton_matches_torch(monkeypatch):
    from rat_plugins.models.vim import vim_tiny_backbone

    torch.manual_seed(0)
    model = vim_tiny_backbone().cuda().train()
    img = torch.randn(2, 3, 224, 320, device="cuda")
    results = {}
    for backend in ("triton", "torch"):
        monkeypatch.setenv(ss.BACKEND_ENV, backend)
        model.zero_grad()
        out = model(img)
        out.square().mean().backward()
        results[backend] = (
            out.detach(),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
        )
    (out_t, grads_t), (out_p, grads_p) = results["triton"], results["torch"]
    assert_close(out_t, out_p, "backbone output", 1e-3)
    assert set(grads_t) == set(grads_p)
    for name in grads_p:
        assert_close(grads_t[name], grads_p[name], name, 1e-3)


def ofat_detector_step(device, backends, monkeypatch, datasets, size=320):
    """One training step of the OFAT baseline detector (frozen ViM-tiny, neck, Cascade R-CNN) per scan
    backend, same weights, inputs and sampling: ``{backend: (losses, gradients)}``."""
    from detectron2.config import LazyConfig, instantiate
    from detectron2.structures import Boxes, Instances
    from detectron2.utils.events import EventStorage

    monkeypatch.setenv("RAT_DATASETS", str(datasets))  # the config counts the training images
    cfg = LazyConfig.load(str(REPO / "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py"))
    cfg.model.backbone.net.checkpoint = ""  # random weights: no checkpoint to download here
    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    images = torch.randint(0, 256, (2, 3, size, size), generator=torch.Generator().manual_seed(0)).float()
    boxes = torch.tensor([[40.0, 60.0, 130.0, 150.0], [200.0, 190.0, 260.0, 280.0]])
    batch = []
    for image in images:
        instances = Instances((size, size), gt_boxes=Boxes(boxes), gt_classes=torch.zeros(2, dtype=torch.long))
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    results = {}
    for backend in backends:
        monkeypatch.setenv(ss.BACKEND_ENV, backend)
        model.zero_grad()
        torch.manual_seed(1)  # the same proposals and RoIs are sampled for every backend
        with EventStorage():  # detectron2's training forward logs into one
            losses = model(batch)
        sum(losses.values()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = ({k: v.item() for k, v in losses.items()}, grads)
    return results


def assert_same_step(results, tolerance):
    (losses_a, grads_a), (losses_b, grads_b) = results.values()
    assert losses_a.keys() == losses_b.keys() and grads_a.keys() == grads_b.keys()
    for name in losses_a:
        assert losses_a[name] == pytest.approx(losses_b[name], rel=tolerance, abs=tolerance), name
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], name, tolerance)


@pytest.mark.slow
def test_ofat_detector_step_is_the_same_on_the_cpu_backends(heads_data, monkeypatch):
    """The comparison the GPU test below makes, on CPU: the C++ and PyTorch scans."""
    assert_same_step(ofat_detector_step("cpu", ("cpp", "torch"), monkeypatch, heads_data, size=96), 1e-4)


@pytest.mark.gpu
def test_gpu_ofat_detector_step_triton_matches_torch(heads_data, monkeypatch):
    assert_same_step(ofat_detector_step("cuda", ("triton", "torch"), monkeypatch, heads_data), 1e-3)


if __name__ == "__main__":
    compute_all(sys.argv[1])
