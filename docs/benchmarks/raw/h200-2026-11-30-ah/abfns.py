"""A/B of 'sort_pairs writes each row's token and int64 row indices' (new) against the kernels the
code before it ran (old): importing this module wraps cmoe.triton_experts.sort_pairs; with OLD set it
adds the two launches the old code ran after the sort: `order // a` (int32, P elements; here
`tokens // 1`) and, on the rows path (top-k up to GMM_ROWS_MAX_SLOTS), the int32 -> int64 copy of the
row index (here a copy of the int64 one)."""
import torch
import cmoe.triton_experts as te

OLD = False
_new = te.sort_pairs


def sort_pairs(idx, num_experts):
    tokens, ends, pos = _new(idx, num_experts)
    if OLD:
        tokens = torch.floor_divide(tokens, 1)
        if idx.shape[1] <= te.GMM_ROWS_MAX_SLOTS:
            pos = pos.clone()
    return tokens, ends, pos


te.sort_pairs = sort_pairs
