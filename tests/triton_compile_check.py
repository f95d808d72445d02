"""Lower every Triton kernel of ``cmoe.triton_experts``, ``cmoe.decode_attention`` and ``cmoe.gemv`` to Triton IR for a Hopper GPU (sm_90),
on any machine: the front end of Triton's NVIDIA backend needs no GPU. The interpreter that
the other tests use runs the kernels' Python, but not the compiler's type checks (for
example, a variable that is int64 in one branch of an ``if`` and int32 in the other); this
catches those. Only the front end runs (``make_ir``), a few seconds in all; ``--full`` runs the
whole compilation to PTX and cubin (minutes); ``--loads`` compiles the bf16 kernels to
PTX and checks that their weight loads are vectorised, and that the decode attention's shared memory
stays under ``SHARED_LIMIT`` at every head size (about 20 s). Run as a script with TRITON_INTERPRET unset;
prints one line per kernel and exits 1 if any failed. ``tests/test_triton_experts.py`` runs it."""

from __future__ import annotations

import re
import sys

import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.compiler.errors import CompilationError

from cmoe import decode_attention as da
from cmoe import gemv
from cmoe import triton_experts as te

TARGET = GPUTarget("cuda", 90, 32)


def signature(kernel, pointers: dict[str, str], consts: dict) -> dict[str, str]:
    """Arguments named ``*_ptr`` get the pointer type from ``pointers`` (default: the "x" entry),
    constexpr arguments "constexpr", the rest the type ``pointers`` gives them, or i32."""
    sig = {}
    for name in kernel.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = pointers.get(name, pointers["x"])
        else:
            sig[name] = pointers.get(name, "i32")  # a float argument is named in ``pointers`` too
    return sig


def cases():
    """(label, kernel, pointer types, constexprs): every kernel in the configurations the module uses."""
    for dt, upcast_ieee in (("*bf16", dict(UPCAST=False, IEEE=False)), ("*fp32", dict(UPCAST=False, IEEE=True))):
        ptrs = {"x": dt, "idx_ptr": "*i64", "wt_ptr": "*fp32", "sorted_ptr": "*i32", "tile_expert_ptr": "*i32"}
        for S in (0, 3):
            bn, bk, _ = te.GEMV_CONFIG["gate_up"]
            yield (f"gemv_gate_up {dt} S={S}", te._gemv_gate_up, {**ptrs, "h_ptr": "*fp32"},
                   dict(A=3, S=S, ACT=0, BN=bn, BK=bk))
            for linear, pdl in ((False, False), (True, False), (False, True)):
                # the router and every slot's gate/up in one launch (GEMV op); launched with PDL (cmoe.pdl)
                yield (f"gemv_route_gate_up {dt} S={S} linear={linear}" + " pdl" * pdl, te._gemv_route_gate_up,
                       {**ptrs, "h_ptr": "*fp32", "bias_ptr": "*fp32", "scale_ptr": "*fp32", "p_ptr": "*fp32",
                        "part_ptr": "*fp32", "sync_ptr": "*i32"},
                       dict(A=3, S=S, ACT=0, BN=bn, BK=bk, SPLITS=16, BT=16, BE=16, RBK=128, LINEAR=linear, PDL=pdl,
                            **upcast_ieee))
            bn, bk, _ = te.GEMV_CONFIG["down"]
            for reset, pdl in ((False, False), (True, False), (True, True)):
                yield (f"gemv_down {dt} S={S} reset={reset}" + " pdl" * pdl, te._gemv_down,
                       {**ptrs, "h_ptr": "*fp32", "sync_ptr": "*i32"}, dict(A=3, S=S, BN=bn, BK=bk, RESET=reset, PDL=pdl))
            bn, bk, _, _ = te.FEW_CONFIG["gate_up"]
            yield (f"few_gate_up {dt} S={S}", te._few_gate_up, ptrs,
                   dict(A=3, AP=4, S=S, ACT=1, TP=16, BN=bn, BK=bk, **upcast_ieee))
            bn, bk, _, _ = te.FEW_CONFIG["down"]
            yield (f"few_down {dt} S={S}", te._few_down, ptrs, dict(A=3, AP=4, S=S, K=4, TP=16, BN=bn, BK=bk, **upcast_ieee))
            for _, cfg in te.GROUPED_CONFIGS:
                bt = cfg["bt"]
                bn, bk, _, _ = cfg["gate_up"]
                for paired in (False, True):
                    yield (f"grouped_gate_up {dt} S={S} bt={bt}" + " paired" * paired, te._grouped_gate_up, ptrs,
                           dict(A=3, S=S, ACT=0, BT=bt, BN=bn, BK=bk, GROUP=8, PAIRED=paired, EVEN_K=paired, **upcast_ieee))
                bn, bk, _, _ = cfg["down"]
                yield (f"grouped_down {dt} S={S} bt={bt}", te._grouped_down, ptrs,
                       dict(A=3, S=S, BT=bt, BN=bn, BK=bk, GROUP=8, **upcast_ieee))
            # the router's weights in the activations' dtype; its bias and scale (E values, loaded once
            # per program, element by element in bf16) as fp32, so that --loads counts the weights only
            for limit, cfg in te.MASKED_CONFIGS:
                bt, linear = cfg["bt"], S == 0
                mptrs = {**ptrs, "sc_ptr": "*fp32", "bias_ptr": "*fp32", "scale_ptr": "*fp32"}
                bn, bk, _, _ = cfg["gate_up"]
                yield (f"masked_gate_up {dt} S={S} T<={limit}", te._masked_gate_up, mptrs,
                       dict(S=S, ACT=0, BT=bt, BN=bn, BK=bk, BE=16, R_IEEE=upcast_ieee["IEEE"], LINEAR=linear, **upcast_ieee))
                bn, bk, _, _ = cfg["down"]
                yield (f"masked_down {dt} S={S} T<={limit}", te._masked_down, mptrs,
                       dict(A=3, S=S, K=4, ACT=0, BT=bt, BN=bn, BK=bk, BE=16, LINEAR=linear, **upcast_ieee))
    gptrs = {"x": "*bf16", "pos_ptr": "*i64", "idx_ptr": "*i64", "wt_ptr": "*fp32"}  # the glue of the prefill paths
    for act in range(len(te._ACT_CODE)):
        yield (f"glu_rows *bf16 act={act}", te._glu_rows, gptrs, dict(A=0, ACT=act, BM=1024))
    for dt in ("*bf16", "*fp32"):  # the dense path: the routing weights applied with the activation
        yield (f"glu_rows {dt} routed", te._glu_rows, {**gptrs, "x": dt}, dict(A=3, ACT=0, BM=1024))
    for pos, extra in ((True, False), (True, True), (False, True), (False, False)):  # grouped_mm path; grouped path
        yield (f"sum_rows *bf16 pos={pos} extra={extra}", te._sum_rows, gptrs,
               dict(A=3, POS=pos, WEIGHT=pos, EXTRA=extra, BD=1024))
    for S in (0, 3):
        yield (f"align_count S={S}", te._align_count_kernel, {"x": "*i32", "idx_ptr": "*i64"},
               dict(A=3, S=S, CHUNK=256, EB=16))
        for one in (False, True):
            yield (f"align_place S={S} one={one}", te._align_place_kernel, {"x": "*i32", "idx_ptr": "*i64"},
                   dict(A=3, S=S, BT=64, CHUNK=256, EB=16, CB=32, TB=512, ONE=one))
    for one in (False, True):  # the grouped_mm path's sort
        yield (f"sort_place one={one}", te._sort_place_kernel, {"x": "*i32", "idx_ptr": "*i64", "pos_ptr": "*i64"},
               dict(A=2, CHUNK=256, EB=16, CB=32, ONE=one))
    for xdt, wdt in (("*bf16", "*bf16"), ("*bf16", "*fp32"), ("*fp32", "*fp32")):
        ieee = wdt == "*fp32" or xdt == "*fp32"
        rptrs = {"x": wdt, "x_ptr": xdt, "bias_ptr": "*fp32", "scale_ptr": "*fp32", "idx_ptr": "*i64",
                 "wt_ptr": "*fp32", "p_ptr": "*fp32", "part_ptr": "*fp32"}
        for linear in (False, True):
            flags = dict(UPCAST=False, IEEE=ieee, LINEAR=linear)
            yield (f"route {xdt}/{wdt} linear={linear}", te._route_kernel, rptrs,
                   dict(A=2, ACT=0, BT=64, BE=16, BK=64, **flags))
            yield (f"route_partial {xdt}/{wdt} linear={linear}", te._route_partial_kernel, rptrs,
                   dict(BT=16, BE=16, BK=128, **flags))
            yield (f"route_reduce {xdt}/{wdt} linear={linear}", te._route_reduce_kernel, rptrs,
                   dict(A=2, ACT=0, BT=16, BE=16, LINEAR=linear))

    for dt, flags in (("*bf16", dict(UPCAST=False, IEEE=False)), ("*fp32", dict(UPCAST=False, IEEE=True))):
        aptrs = {"x": dt, "mask_ptr": "*u8", "part_ptr": "*fp32", "stat_ptr": "*fp32", "ticket_ptr": "*i32",
                 "pos_ptr": "*i64", "qk_scale": "fp32"}
        for slices, mask, dp, rope, pdl in ((1, True, 128, False, False), (8, True, 128, False, False),
                                            (8, False, 128, False, False), (8, True, 256, False, False),
                                            (1, True, 64, False, False), (8, True, 128, True, False),
                                            (1, True, 64, True, False), (8, True, 128, True, True)):
            # the decode attention: one slice, merged slices; head sizes 64-256; with the rotary embedding and cache
            # write; launched with PDL (cmoe.pdl)
            yield (f"decode_attention {dt} slices={slices} mask={mask} head={dp} rope={rope}" + " pdl" * pdl,
                   da._decode_attention_kernel, aptrs,
                   dict(GP=16, DP=dp, BN=da.block_keys(dp), SLICES=slices, SP=max(2, slices), HAS_MASK=mask, ROPE=rope,
                        PDL=pdl, **flags))
        bn, bk, _ = gemv.GEMV_TILE
        for bias, pdl in ((False, False), (True, False), (False, True)):  # one row through a linear layer
            yield (f"gemv {dt} bias={bias}" + " pdl" * pdl, gemv._gemv_kernel, {"x": dt},
                   dict(HAS_BIAS=bias, BN=bn, BK=bk, PDL=pdl))


def front_end(src: ASTSource) -> None:
    """What ``triton.compile`` does before its first lowering pass: AST -> Triton IR, verified."""
    backend = make_backend(TARGET)
    options = backend.parse_options(src.parse_options())
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)
    if not module.verify():
        raise RuntimeError("the Triton IR does not verify")


# The runtime specialises pointers and the sizes d, m, ms that are multiples of 16 (the real
# models' are; for the decode attention, the head size and the strides of q, k, v, the new k and v
# and cos/sin); the weight loads of the expert kernels must then compile to 128-bit vector
# loads or asynchronous copies. A scalar 16-bit load ("ld.global....b16") in the PTX means the
# compiler lost the rows' alignment: Triton 3.6 did so through an ``if`` that picked the
# weight pointers, and those kernels ran 2-3x slower on the H200.
ALIGNED_INTS = ("d", "m", "ms", "D", "K", "sq_b", "sq_h", "sk_b", "sk_h", "sk_l", "sv_b", "sv_h", "sv_l",
                "skn_b", "skn_h", "svn_b", "svn_h", "sc_b", "ss_b")


def aligned_attrs(kernel, consts: dict) -> dict:
    return {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(kernel.arg_names)
        if name not in consts and (name.endswith("_ptr") or name in ALIGNED_INTS)
    }


def scalar_bf16_loads(kernel, ptrs, consts) -> tuple[int, int]:
    """Compile to PTX with the runtime's alignment specialisation: (scalar 16-bit global loads,
    bytes of shared memory per program)."""
    src = ASTSource(fn=kernel, signature=signature(kernel, ptrs, consts), constexprs=consts,
                    attrs=aligned_attrs(kernel, consts))
    compiled = triton.compile(src, target=TARGET)
    return len(re.findall(r"ld\.global[.:\w]*\.b16\b", compiled.asm["ptx"])), compiled.metadata.shared


SHARED_LIMIT = 100 * 1024  # the decode attention at any head size: well under sm_90's 227 KB per program


def loads() -> int:
    """The bf16 expert kernels (not the router: its [E, d] weights are tiny) must not load
    element by element."""
    failed = 0
    router = {}  # the router's own scalar loads, which the kernel that also routes may have
    for label, kernel, ptrs, consts in cases():
        if label.startswith("route_partial *bf16/*bf16"):
            router[consts["LINEAR"]] = scalar_bf16_loads(kernel, ptrs, consts)[0]
    for label, kernel, ptrs, consts in cases():
        if "bf16" not in label or label.startswith(("align", "route")) or label.endswith("bias=True"):
            continue  # (gemv's bias: BN entries per program, read one by one; its weight loads are checked without)
        n, shared = scalar_bf16_loads(kernel, ptrs, consts)
        n -= router[consts["LINEAR"]] if label.startswith("gemv_route") else 0
        bad = n != 0 or (label.startswith("decode_attention") and shared > SHARED_LIMIT)
        failed += bad
        print("FAIL" if bad else "ok  ", label, f"{n} scalar 16-bit global loads (the router's not counted), "
              f"{shared} bytes of shared memory", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if "--loads" in argv:
        return loads()
    failed = 0
    for i, (label, kernel, ptrs, consts) in enumerate(cases()):
        src = ASTSource(fn=kernel, signature=signature(kernel, ptrs, consts), constexprs=consts)
        try:
            triton.compile(src, target=TARGET) if "--full" in argv else front_end(src)
            print("ok  ", label, flush=True)
        except CompilationError as e:
            failed += 1
            print("FAIL", label, type(e).__name__, str(e).replace("\n", " ")[:400], flush=True)
        except Exception as e:  # noqa: BLE001
            if i == 0:  # Triton's internal compile API differs from the one this script drives
                print(f"UNSUPPORTED triton {triton.__version__}: {type(e).__name__}: {e}", flush=True)
                return 2
            failed += 1
            print("FAIL", label, type(e).__name__, str(e).replace("\n", " ")[:400], flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
