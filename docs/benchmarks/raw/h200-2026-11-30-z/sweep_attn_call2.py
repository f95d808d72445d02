"""Session 21: decode_attention's BLOCK_KEYS and PROGRAMS_PER_SM, through bench_decode_attention."""
import sys

import bench_decode_attention as b
from cmoe import decode_attention as da

for spec in sys.argv[1].split(","):
    bk, pps = map(int, spec.split("/"))
    da.BLOCK_KEYS, da.PROGRAMS_PER_SM = bk, pps
    print(f"## BLOCK_KEYS {bk} PROGRAMS_PER_SM {pps}", flush=True)
    b.main(sys.argv[2:])
