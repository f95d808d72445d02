import os, sys, time, torch
sys.path.insert(0, '/work/main/benchmarks')
import cmoe, cmoe.convert as CV
from cmoe.convert import *
from cmoe.convert import _record_layer_calls, _sensitivity_pass, _to, _first, _ZeroProbe, _peak_memory
from cmoe.carve import carve, fit_sample
from cmoe.refit import refit_down
BETA = float(os.environ.get('BETA', '1'))

@torch.no_grad()
def convert_(model, config, calib_ids, device=None, batch_size=4, progress=True):
    family = family_of(model.config); layers = family.layers(model)
    device = torch.device(device or "cpu")
    start = time.perf_counter(); report = ConversionReport(config); torch.manual_seed(config.seed)
    hidden, calls = _record_layer_calls(model, layers, calib_ids, "cpu")
    dense_hidden = hidden.clone()
    plan = [config] * len(layers)
    if config.allocation == "sensitivity":
        report.sensitivity = _sensitivity_pass(model, family, layers, hidden, calls, config, device, batch_size).tolist()
        plan = [config.replace(shared=a.shared, active=a.active, budget=None, allocation="uniform")
                for a in allocation.allocate(torch.tensor(report.sensitivity), config)]
    for i, layer in enumerate(layers):
        t0 = time.perf_counter()
        args, kwargs = calls[i]
        mlp = getattr(layer, family.mlp_attr)
        def run(hid):
            probe = _ZeroProbe(); setattr(layer, family.mlp_attr, probe)
            try:
                res = torch.cat([_first(layer(h, *args, **kwargs)) for h in hid.split(batch_size)])
            finally:
                setattr(layer, family.mlp_attr, mlp)
            return res, torch.cat(probe.inputs)
        residual, x = run(hidden)
        rd, xd = run(dense_hidden)
        dense_next = rd + mlp(xd).view_as(rd)
        weights = family.read(mlp, model.config)
        cfg = plan[i]
        moe, stats = carve(weights, x, cfg.replace(refit="none"))
        if cfg.refit == "down":
            stride = max(1, x.shape[0] // cfg.fit_tokens)
            xs = x[::stride]
            local = mlp(xs)
            t = (dense_next - residual).reshape(-1, x.shape[-1])[::stride]
            target = local + BETA * (t - local)
            stats.error_before_refit, stats.error = refit_down(moe, xs, cfg.refit_ridge, target=target)
        setattr(layer, family.mlp_attr, moe)
        hidden = residual + moe(x).view_as(residual)
        dense_hidden = dense_next
        report.layers.append(LayerReport(i, time.perf_counter() - t0, stats))
        print(i, f"{stats.error_before_refit:.4f} -> {stats.error:.4f}", f"{time.perf_counter()-t0:.1f}s", file=sys.stderr, flush=True)
    model.config.cmoe = {"config": config.to_dict(), "layers": []}
    report.seconds = time.perf_counter() - start
    return report

cmoe.convert_ = convert_
import ablation
ablation.main(sys.argv[1:])
