"""Triton kernels of :mod:`rat_plugins.models.ops.triton_scan` (imported only when Triton is).

One program handles ``BLOCK_D`` channels of one batch row (and, for the bidirectional mixer, one
of the two directions: ``program_id(2)``) and walks over the sequence in chunks of ``BLOCK_L``
scan steps. Inside a chunk the pairs (a, x) = (exp(delta A), delta u B), a [BLOCK_D, BLOCK_N,
BLOCK_L] tile, are combined by ``tl.associative_scan`` under (a1, x1) o (a2, x2) = (a1 a2, a2 x1 +
x2); the state carried from the previous chunk then gives every step's state. Direction 1 maps
scan step k to time L - 1 - k, so it scans from the end without a flipped copy.

Steps past the end are identity steps (delta forced to 0: decay 1, input 0), so the state in the
chunk's last column is the state after the last real step. The backward kernel walks the chunks
from the end, recomputes each chunk's states from the state saved at its start, and runs the
adjoint recurrence lambda_t = exp(delta_{t+1} A) lambda_{t+1} + gy_t C_t as a reverse scan.
"""

import triton
import triton.language as tl


@triton.jit
def _combine(a1, x1, a2, x2):
    # step (a1, x1) then (a2, x2): s -> a2 (a1 s + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    # log1p(exp(x)) from log alone: log(1 + e) * e / ((1 + e) - 1) undoes the rounding of 1 + e, so
    # tiny results keep their digits (threshold 20 as mamba-ssm)
    e = tl.exp(x)
    one_e = 1.0 + e
    small = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / (one_e - 1.0)))
    return tl.where(x > 20.0, x, small)


@triton.jit
def _step_delta(dl_ptr, bias, offs, mask, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, COMPUTE: tl.constexpr):
    """(delta after bias and softplus, 0 on masked steps; delta before softplus)."""
    pre = tl.load(dl_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    if HAS_BIAS:
        pre = pre + bias[:, None]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return tl.where(mask, dt, 0.0), pre


@triton.jit
def scan_fwd_kernel(
    u0,
    u1,
    dl0,
    dl1,
    B0,
    B1,
    C0,
    C1,
    z_ptr,
    A_ptr,
    D_ptr,
    bias_ptr,
    out_ptr,
    last_ptr,
    ck_ptr,
    dim,
    L,
    n_state,
    dim_per_group,
    n_chunks,
    s_ub,
    s_ud,
    s_ut,
    s_db,
    s_dd,
    s_dt,
    s_Bb,
    s_Bg,
    s_Bn,
    s_Bt,
    s_Cb,
    s_Cg,
    s_Cn,
    s_Ct,
    s_zb,
    s_zd,
    s_zt,
    s_ob,
    s_od,
    s_ot,
    scale,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BIDIR: tl.constexpr,
    STORE_CK: tl.constexpr,
    STORE_LAST: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """out = (scan + D u) * silu(z) (BIDIR: out += scale * that, atomically, both directions)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rev = tl.program_id(2)
    batch = tl.num_programs(0)
    u_ptr = tl.where(rev == 0, u0, u1)
    dl_ptr = tl.where(rev == 0, dl0, dl1)
    B_ptr = tl.where(rev == 0, B0, B1)
    C_ptr = tl.where(rev == 0, C0, C1)

    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # BLOCK_D divides dim_per_group: no channel mask
    n = tl.arange(0, BLOCK_N)
    n_mask = n < n_state
    steps = tl.arange(0, BLOCK_L)
    g = (pid_d * BLOCK_D) // dim_per_group

    A = tl.load(A_ptr + (rev * dim + d[:, None]) * n_state + n[None, :], mask=n_mask[None, :], other=0.0)
    A = A.to(COMPUTE)
    Dv = tl.zeros([BLOCK_D], COMPUTE)
    if HAS_D:
        Dv = tl.load(D_ptr + rev * dim + d).to(COMPUTE)
    bias = tl.zeros([BLOCK_D], COMPUTE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rev * dim + d).to(COMPUTE)

    state = tl.zeros([BLOCK_D, BLOCK_N], COMPUTE)
    ck_row = ((rev * batch + pid_b) * dim + d[:, None]) * n_chunks  # [BLOCK_D, 1]
    for c in range(0, n_chunks):
        k = c * BLOCK_L + steps
        km = k < L
        t = tl.where(rev == 1, L - 1 - k, k)
        m2 = km[None, :]
        dt, _ = _step_delta(
            dl_ptr, bias, pid_b * s_db + d[:, None] * s_dd + t[None, :] * s_dt, m2, HAS_BIAS, SOFTPLUS, COMPUTE
        )
        u = tl.load(u_ptr + pid_b * s_ub + d[:, None] * s_ud + t[None, :] * s_ut, mask=m2, other=0.0).to(COMPUTE)
        mn = n_mask[:, None] & m2
        Bt = tl.load(B_ptr + pid_b * s_Bb + g * s_Bg + n[:, None] * s_Bn + t[None, :] * s_Bt, mask=mn, other=0.0)
        Ct = tl.load(C_ptr + pid_b * s_Cb + g * s_Cg + n[:, None] * s_Cn + t[None, :] * s_Ct, mask=mn, other=0.0)
        if STORE_CK:  # the state at the chunk's start, for the backward pass
            tl.store(ck_ptr + (ck_row + c) * n_state + n[None, :], state, mask=n_mask[None, :])
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        x = (dt * u)[:, None, :] * Bt.to(COMPUTE)[None, :, :]
        ac, xc = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
        s = ac * state[:, :, None] + xc
        y = tl.sum(s * Ct.to(COMPUTE)[None, :, :], axis=1)
        if HAS_D:
            y += Dv[:, None] * u
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * s_zb + d[:, None] * s_zd + t[None, :] * s_zt, mask=m2, other=0.0)
            zt = zt.to(COMPUTE)
            y = y * zt * tl.sigmoid(zt)
        state = tl.sum(tl.where((steps == BLOCK_L - 1)[None, None, :], s, 0.0), axis=2)
        o_ptrs = out_ptr + pid_b * s_ob + d[:, None] * s_od + t[None, :] * s_ot
        if BIDIR:  # out starts at 0 and gets exactly two adds: the same sum in either order
            tl.atomic_add(o_ptrs, y * scale, mask=m2)
        else:
            tl.store(o_ptrs, y, mask=m2)
    if STORE_LAST:
        tl.store(
            last_ptr + ((rev * batch + pid_b) * dim + d[:, None]) * n_state + n[None, :], state, mask=n_mask[None, :]
        )


@triton.jit
def scan_bwd_kernel(
    u0,
    u1,
    dl0,
    dl1,
    B0,
    B1,
    C0,
    C1,
    z_ptr,
    A_ptr,
    D_ptr,
    bias_ptr,
    ck_ptr,
    gout_ptr,
    glast_ptr,
    gu_ptr,
    gdl_ptr,
    gB_ptr,
    gC_ptr,
    gz_ptr,
    gA_ptr,
    gD_ptr,
    gbias_ptr,
    dim,
    L,
    n_state,
    dim_per_group,
    n_groups,
    n_chunks,
    s_ub,
    s_ud,
    s_ut,
    s_db,
    s_dd,
    s_dt,
    s_Bb,
    s_Bg,
    s_Bn,
    s_Bt,
    s_Cb,
    s_Cg,
    s_Cn,
    s_Ct,
    s_zb,
    s_zd,
    s_zt,
    s_gb,
    s_gd,
    s_gt,
    scale,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    BIDIR: tl.constexpr,
    HAS_GLAST: tl.constexpr,
    COMPUTE: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    """Gradients of the forward kernel's output (and last state), chunks from the end.

    gu, gdelta: [ndir, batch, dim, L]; gB, gC: [ndir, batch, groups, state, L] (zeroed, atomic
    adds over the channel blocks of a group); gz: [batch, dim, L] (BIDIR: zeroed, two adds);
    gA: [ndir, batch, dim, state], gD, gbias: [ndir, batch, dim] (summed over batch by the caller).
    """
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    rev = tl.program_id(2)
    batch = tl.num_programs(0)
    u_ptr = tl.where(rev == 0, u0, u1)
    dl_ptr = tl.where(rev == 0, dl0, dl1)
    B_ptr = tl.where(rev == 0, B0, B1)
    C_ptr = tl.where(rev == 0, C0, C1)

    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    n_mask = n < n_state
    steps = tl.arange(0, BLOCK_L)
    g = (pid_d * BLOCK_D) // dim_per_group

    A = tl.load(A_ptr + (rev * dim + d[:, None]) * n_state + n[None, :], mask=n_mask[None, :], other=0.0)
    A = A.to(COMPUTE)
    Dv = tl.zeros([BLOCK_D], COMPUTE)
    if HAS_D:
        Dv = tl.load(D_ptr + rev * dim + d).to(COMPUTE)
    bias = tl.zeros([BLOCK_D], COMPUTE)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rev * dim + d).to(COMPUTE)

    row = (rev * batch + pid_b) * dim + d  # [BLOCK_D] row of (direction, batch, channel)
    lam = tl.zeros([BLOCK_D, BLOCK_N], COMPUTE)
    if HAS_GLAST:
        lam = tl.load(glast_ptr + row[:, None] * n_state + n[None, :], mask=n_mask[None, :], other=0.0)
        lam = lam.to(COMPUTE)
    gA_acc = tl.zeros([BLOCK_D, BLOCK_N], COMPUTE)
    gD_acc = tl.zeros([BLOCK_D], COMPUTE)
    gbias_acc = tl.zeros([BLOCK_D], COMPUTE)
    gBC_row = (((rev * batch + pid_b) * n_groups + g) * n_state + n[:, None]) * L  # [BLOCK_N, 1]
    for i in range(0, n_chunks):
        c = n_chunks - 1 - i
        k = c * BLOCK_L + steps
        km = k < L
        t = tl.where(rev == 1, L - 1 - k, k)
        m2 = km[None, :]
        dt, pre = _step_delta(
            dl_ptr, bias, pid_b * s_db + d[:, None] * s_dd + t[None, :] * s_dt, m2, HAS_BIAS, SOFTPLUS, COMPUTE
        )
        u = tl.load(u_ptr + pid_b * s_ub + d[:, None] * s_ud + t[None, :] * s_ut, mask=m2, other=0.0).to(COMPUTE)
        mn = n_mask[:, None] & m2
        Bt = tl.load(B_ptr + pid_b * s_Bb + g * s_Bg + n[:, None] * s_Bn + t[None, :] * s_Bt, mask=mn, other=0.0)
        Ct = tl.load(C_ptr + pid_b * s_Cb + g * s_Cg + n[:, None] * s_Cn + t[None, :] * s_Ct, mask=mn, other=0.0)
        Bt = Bt.to(COMPUTE)
        Ct = Ct.to(COMPUTE)
        # this chunk's states again, from the one saved at its start
        s0 = tl.load(ck_ptr + (row[:, None] * n_chunks + c) * n_state + n[None, :], mask=n_mask[None, :], other=0.0)
        du = dt * u
        a = tl.exp(dt[:, None, :] * A[:, :, None])
        x = du[:, None, :] * Bt[None, :, :]
        ac, xc = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
        s = ac * s0.to(COMPUTE)[:, :, None] + xc

        g_offs = pid_b * s_gb + d[:, None] * s_gd + t[None, :] * s_gt
        gy = tl.load(gout_ptr + g_offs, mask=m2, other=0.0).to(COMPUTE)
        if BIDIR:
            gy = gy * scale
        if HAS_Z:
            zt = tl.load(z_ptr + pid_b * s_zb + d[:, None] * s_zd + t[None, :] * s_zt, mask=m2, other=0.0)
            zt = zt.to(COMPUTE)
            sig = tl.sigmoid(zt)
            y = tl.sum(s * Ct[None, :, :], axis=1) + Dv[:, None] * u
            gz = gy * y * sig * (1.0 + zt * (1.0 - sig))
            gz_ptrs = gz_ptr + (pid_b * dim + d[:, None]) * L + t[None, :]
            if BIDIR:
                tl.atomic_add(gz_ptrs, gz, mask=m2)
            else:
                tl.store(gz_ptrs, gz, mask=m2)
            gy = gy * zt * sig

        # decays of the next scan step (1 after the last), then the adjoint as a reverse scan
        k1 = k + 1
        t1 = tl.where(rev == 1, L - 1 - k1, k1)
        dt1, _ = _step_delta(
            dl_ptr,
            bias,
            pid_b * s_db + d[:, None] * s_dd + t1[None, :] * s_dt,
            (k1 < L)[None, :],
            HAS_BIAS,
            SOFTPLUS,
            COMPUTE,
        )
        a1 = tl.exp(dt1[:, None, :] * A[:, :, None])
        ra, rx = tl.associative_scan((a1, gy[:, None, :] * Ct[None, :, :]), axis=2, combine_fn=_combine, reverse=True)
        lam_t = rx + ra * lam[:, :, None]
        lam = tl.sum(tl.where((steps == 0)[None, None, :], lam_t, 0.0), axis=2)

        tl.atomic_add(gC_ptr + gBC_row + t[None, :], tl.sum(gy[:, None, :] * s, axis=0), mask=mn)
        tl.atomic_add(gB_ptr + gBC_row + t[None, :], tl.sum(lam_t * du[:, None, :], axis=0), mask=mn)
        lB = tl.sum(lam_t * Bt[None, :, :], axis=1)
        decayed = s - x  # exp(delta A) * previous state, without a division
        gdt = tl.sum(lam_t * decayed * A[:, :, None], axis=1) + u * lB
        gA_acc += tl.sum(lam_t * decayed * dt[:, None, :], axis=2)
        gu = dt * lB
        if HAS_D:
            gu += Dv[:, None] * gy
            gD_acc += tl.sum(gy * u, axis=1)
        if SOFTPLUS:
            gdt = gdt * tl.sigmoid(pre)
        gdt = tl.where(m2, gdt, 0.0)
        if HAS_BIAS:
            gbias_acc += tl.sum(gdt, axis=1)
        out_offs = row[:, None] * L + t[None, :]
        tl.store(gu_ptr + out_offs, gu, mask=m2)
        tl.store(gdl_ptr + out_offs, gdt, mask=m2)
    tl.store(gA_ptr + row[:, None] * n_state + n[None, :], gA_acc, mask=n_mask[None, :])
    if HAS_D:
        tl.store(gD_ptr + row, gD_acc)
    if HAS_BIAS:
        tl.store(gbias_ptr + row, gbias_acc)
