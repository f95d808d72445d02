# Session 37, call 2: the pieces of the two-launch prototype alone, against cuBLAS's; is nvcc here
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/benchmarks
date -u +%T
which nvcc; ls -d /usr/local/cuda*/bin 2>&1 | head -3; python -c "import torch.utils.cpp_extension as c; print('CUDA_HOME', c.CUDA_HOME)"
timeout 300 python .carry/s37/fd_bench.py parts > $OUT/call2-parts.txt 2>&1; echo rc=$?
grep -v -i warn $OUT/call2-parts.txt | tail -40
date -u +%T
