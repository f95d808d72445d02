import re, sys, collections
root = sys.argv[1]
sys.path.insert(0, root + "/tests"); sys.path.insert(0, root + "/src")
import triton_compile_check as cc
from triton.compiler import ASTSource
import triton
want = ("gemv_down *bf16", "grouped_down *bf16", "few_down *bf16", "masked_down *bf16")
for label, kernel, ptrs, consts in cc.cases():
    if label.startswith(want):
        src = ASTSource(fn=kernel, signature=cc.signature(kernel, ptrs, consts), constexprs=consts, attrs=cc.aligned_attrs(kernel, consts))
        ptx = triton.compile(src, target=cc.TARGET).asm["ptx"]
        ops = collections.Counter(re.findall(r"^\s+(ld\.global[.\w]*|cp\.async[.\w]*|mma[.\w]*|wgmma[.\w]*|fma[.\w]*)", ptx, re.M))
        n = len([l for l in ptx.splitlines() if l.strip() and not l.strip().startswith(("//", "."))])
        print(label, n, sorted(ops.items()))
