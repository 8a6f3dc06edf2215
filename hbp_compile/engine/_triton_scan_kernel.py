"""The Triton kernel behind ``engine/triton_scan.py`` (imported only where Triton is wanted: CUDA, or
its interpreter in the tests). Kept apart so that importing the engine never imports Triton."""
import triton
import triton.language as tl


@triton.jit
def _join(k_above, c_above, k_row, c_row):
    # (K, C) of rows [i, top) of a tile, such that w_i = C + K · w_top. Row i joins the rows above
    # it: w_i = c_i + k_i · w_{i+1} = (c_i + k_i C_above) + (k_i K_above) · w_top.
    return k_row * k_above, c_row + k_row * c_above


@triton.jit
def reverse_scan_kernel(out, c, v, k, rows, cols, v_rows, k_rows,
                        MODE: tl.constexpr, HAS_V: tl.constexpr, GIVEN_LAST: tl.constexpr,
                        ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr):
    """``out_t = c_t + v_t + K_t · out_{t+1}`` for rows ``rows - 1 .. 0``, ``BLOCK_F`` columns per program.

    The rows go top down a tile of ``BLOCK_N`` at a time: each tile is scanned in parallel
    (``tl.associative_scan`` of the affine maps ``w ↦ c + k·w``), then applied to the row carried
    from the tile above. O(rows) work; nothing is kept but one carried row.
    MODE 0: K = 1; 1: K = k[0] (a scalar, in c's dtype); 2: K = k[t]; 3: K = k[t] as 0/1 bytes.
    GIVEN_LAST: row ``rows`` of ``out`` is final already (the scan of some rows of a longer one)."""
    col = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    col_ok = col < cols
    if GIVEN_LAST:
        carry = tl.load(out + rows * cols + col, mask=col_ok, other=0.0).to(ACC)
    else:
        carry = tl.zeros([BLOCK_F], dtype=ACC)
    lane = tl.arange(0, BLOCK_N)
    if MODE == 1:
        scalar = tl.load(k).to(ACC)
    for start in tl.range(0, rows, BLOCK_N):
        row = rows - start - BLOCK_N + lane
        ok = (row >= 0)[:, None] & col_ok[None, :]
        offsets = row[:, None] * cols + col[None, :]
        cc = tl.load(c + offsets, mask=ok, other=0.0).to(ACC)
        if HAS_V:
            cc += tl.load(v + offsets, mask=ok & (row < v_rows)[:, None], other=0.0).to(ACC)
        k_ok = ok & (row < k_rows)[:, None]
        if MODE == 0:
            kk = tl.where(k_ok, 1.0, 0.0).to(ACC)
        elif MODE == 1:
            kk = tl.where(k_ok, scalar, 0.0).to(ACC)
        else:
            kk = tl.load(k + offsets, mask=k_ok, other=0).to(ACC)
        k_tile, c_tile = tl.associative_scan((kk, cc), 0, _join, reverse=True)
        w = c_tile + k_tile * carry[None, :]
        tl.store(out + offsets, w.to(out.dtype.element_ty), mask=ok)
        carry = tl.sum(tl.where((lane == 0)[:, None], w, 0.0), axis=0)  # the tile's lowest row
