import sys
sys.path.insert(0, '/work/main/benchmarks')
import ablation
ablation.VARIANTS["plus refit ridge 0.15"] = (dict(recipe="plus", refit_ridge=0.15), None)
ablation.VARIANTS["plus refit ridge 0.6"] = (dict(recipe="plus", refit_ridge=0.6), None)
ablation.main(sys.argv[1:])
