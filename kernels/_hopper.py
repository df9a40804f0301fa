"""Compile the kernels for Hopper (sm_90) on any machine, GPU or not (docs/design.md §8).

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole pipeline to
PTX and cubin without a GPU; `metadata.shared` is the shared memory one block needs. That is
how shipped configs are proven to fit the 232,448 bytes of an H100/H200 on CPU, and how the
sweep prunes candidates before timing them.

Launch-time specialization is imitated: pointers 16-byte aligned, unit strides constant
(row-major X and C, row-major U). A config may also set the kernels' mode flags (`FLAGS`, e.g.
ATOMIC=True, MODE="check") to compile the variants that the default spec does not.
"""

from __future__ import annotations

import functools
import os

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ._common import INTERPRET, pow2

__all__ = ["SM90", "kernel_spec", "compile_info", "shared_bytes", "KERNEL_NAMES"]

SM90 = GPUTarget("cuda", 90, 32)
KERNEL_NAMES = ("compress_fused", "compress_coeff", "compress_y", "reconstruct", "orth_gram",
                "orth_factor", "orth_apply", "grad_coeff")
# Also compilable here, with fixed launch options: the compress pass's partial-sum reduction.
EXTRA_KERNELS = ("compress_reduce",)
# Mode flags a config may override (every value is a separate compiled variant on a GPU).
FLAGS = ("NEED_Y", "ATOMIC", "WRITE_C32", "MODE", "REPAIR", "WITH_Z")


def kernel_spec(kernel: str, D: int, r: int, dtype: str, cfg: dict):
    """(jit function, runtime arg types, constexpr values, options) for one launch config."""
    # Imported here (the package re-exports launchers under the modules' names).
    from ._cholesky import _orth_factor_kernel  # noqa: PLC0415
    from .compress_pass import (  # noqa: PLC0415
        REDUCE_BLOCK,
        _compress_coeff_kernel,
        _compress_fused_kernel,
        _compress_y_kernel,
        _reduce_kernel,
    )
    from .grad_coeff import _grad_coeff_kernel  # noqa: PLC0415
    from .orthonormalize import _orth_apply_kernel, _orth_gram_kernel  # noqa: PLC0415
    from .reconstruct import _reconstruct_kernel  # noqa: PLC0415

    R_PAD = pow2(r)
    cfg = dict(cfg)
    options = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    x = f"*{dtype}"
    prec = dict(PRECISION=cfg.get("PRECISION", "ieee"), INTERPRET=False)
    i32 = "i32"
    if kernel == "compress_fused":
        fn = _compress_fused_kernel
        types = dict(x_ptr=x, u_ptr="*fp32", c_ptr=x, ypart_ptr="*fp32", spart_ptr="*fp32",
                     N=i32, D=i32, R=i32, stride_xn=i32, stride_ud=i32)
        consts = dict(stride_xd=1, stride_ur=1, NEED_Y=True, ATOMIC=False,
                      BLOCK_N=cfg["BLOCK_N"], D_PAD=pow2(D), R_PAD=R_PAD,
                      X_IS_BF16=dtype == "bf16", **prec)
    elif kernel == "compress_coeff":
        fn = _compress_coeff_kernel
        types = dict(x_ptr=x, u_ptr="*fp32", c_ptr=x, c32_ptr="*fp32", spart_ptr="*fp32",
                     N=i32, D=i32, R=i32, stride_xn=i32, stride_ud=i32)
        consts = dict(stride_xd=1, stride_ur=1, WRITE_C32=True, ATOMIC=False,
                      BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], R_PAD=R_PAD,
                      X_IS_BF16=dtype == "bf16", **prec)
    elif kernel == "compress_y":
        fn = _compress_y_kernel
        types = dict(x_ptr=x, c32_ptr="*fp32", ypart_ptr="*fp32", N=i32, D=i32, R=i32,
                     stride_xn=i32, rows_per_seg=i32)
        consts = dict(stride_xd=1, ATOMIC=False, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                      R_PAD=R_PAD, X_IS_BF16=dtype == "bf16", **prec)
    elif kernel == "reconstruct":
        fn = _reconstruct_kernel
        types = dict(c_ptr=x, u_ptr="*fp32", out_ptr=x, N=i32, D=i32, R=i32, stride_cn=i32,
                     stride_ud=i32)
        consts = dict(stride_cr=1, stride_ur=1, BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"],
                      BLOCK_R=min(cfg["BLOCK_R"], R_PAD), C_IS_BF16=dtype == "bf16", **prec)
    elif kernel == "grad_coeff":  # G and C in `dtype`, row-major; D stands for O (out features)
        fn = _grad_coeff_kernel
        types = dict(g_ptr=x, c_ptr=x, part_ptr="*fp32", N=i32, O=i32, R=i32, B=i32,
                     rows_per_split=i32, stride_gb=i32, stride_gn=i32, stride_cb=i32,
                     stride_cn=i32)
        consts = dict(stride_go=1, stride_cr=1, BLOCK_N=cfg["BLOCK_N"],
                      BLOCK_O=cfg["BLOCK_O"], BLOCK_R=min(cfg["BLOCK_R"], R_PAD),
                      BOTH_BF16=dtype == "bf16", G_IS_BF16=dtype == "bf16", **prec)
    elif kernel == "orth_gram":
        fn = _orth_gram_kernel
        types = dict(a_ptr="*fp32", z_ptr="*fp64", meta_ptr="*i64", g_ptr="*fp64",
                     za_ptr="*fp64", nf_ptr="*fp32", rows_per_chunk=i32)
        consts = dict(WITH_Z=True, R_PAD=R_PAD, GT=min(cfg["GRAM_TILE"], R_PAD),
                      BLOCK_D=cfg["BLOCK_D"])
    elif kernel == "orth_factor":
        fn = _orth_factor_kernel
        types = dict(g_ptr="*fp64", za_ptr="*fp64", zz_ptr="*fp64", nf_ptr="*fp32",
                     meta_ptr="*i64", rinv_ptr="*fp64", scale_ptr="*fp64", info_ptr="*i32",
                     ok_ptr="*i1", n_chunk=i32)
        consts = dict(MODE="repair", R_PAD=R_PAD)
    elif kernel == "orth_apply":
        fn = _orth_apply_kernel
        types = dict(src_ptr="*fp32", z_ptr="*fp64", meta_ptr="*i64", rinv_ptr="*fp64",
                     scale_ptr="*fp64", dst_ptr="*fp32", g_ptr="*fp64", rows_per_chunk=i32)
        consts = dict(REPAIR=True, R_PAD=R_PAD, BLOCK_D=cfg["BLOCK_D"], BLOCK_K=min(R_PAD, 32))
    elif kernel == "compress_reduce":
        fn = _reduce_kernel
        types = dict(ypart_ptr="*fp32", y_ptr="*fp32", n_ypart=i32, DR=i32, spart_ptr="*fp32",
                     n_spart=i32, out_ptr="*fp32")
        consts = dict(NEED_Y=True, BLOCK=REDUCE_BLOCK, BLOCK_S=128)
    else:
        raise KeyError(f"unknown kernel {kernel!r}; expected one of "
                       f"{KERNEL_NAMES + EXTRA_KERNELS}")
    consts.update({k: v for k, v in cfg.items() if k in FLAGS and k in consts})
    return fn, types, consts, options


@functools.lru_cache(maxsize=256)
def _compile_cached(kernel: str, D_PAD: int, R_PAD: int, dtype: str, cfg_items: tuple,
                    arch: int):
    fn, types, consts, options = kernel_spec(kernel, D_PAD, R_PAD, dtype, dict(cfg_items))
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
        else:
            signature[name] = types[name]
            if types[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _compile_summary(*key) -> dict:
    compiled = _compile_cached(*key)
    return {"shared": int(compiled.metadata.shared), "ptx": compiled.asm["ptx"],
            "cubin_bytes": len(compiled.asm["cubin"]), "num_warps": compiled.metadata.num_warps}


_POOL = None


def _worker_pool():
    """One spawned worker without TRITON_INTERPRET (interpreted kernels cannot be compiled)."""
    global _POOL
    if _POOL is None:
        import atexit  # noqa: PLC0415
        import multiprocessing  # noqa: PLC0415
        from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

        saved = os.environ.pop("TRITON_INTERPRET", None)  # the child inherits the environment
        try:
            _POOL = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            _POOL.submit(int, 0).result()  # start it now, while the variable is unset
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
        atexit.register(_POOL.shutdown)
    return _POOL


@functools.lru_cache(maxsize=1024)
def _summary(*key) -> dict:
    if INTERPRET:  # this process's kernels are interpreter objects: compile in a clean child
        return _worker_pool().submit(_compile_summary, *key).result()
    return _compile_summary(*key)


def compile_info(kernel: str, D: int, r: int, dtype: str, cfg: dict, arch: int = 90) -> dict:
    """Compile a config for `arch` and return {shared, ptx, cubin_bytes, num_warps}.

    Only D's and r's padded sizes enter the compiled code, so results are cached on them.
    Works under TRITON_INTERPRET=1 too (the compile then runs in a spawned process).
    """
    D_key = pow2(D) if kernel == "compress_fused" else 16
    return _summary(kernel, D_key, pow2(r), dtype, tuple(sorted(cfg.items())), arch)


def shared_bytes(kernel: str, D: int, r: int, dtype: str, cfg: dict, arch: int = 90) -> int:
    """Shared memory (bytes) one block of this kernel config needs on `arch`."""
    return compile_info(kernel, D, r, dtype, cfg, arch)["shared"]
