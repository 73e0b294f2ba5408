"""Weight-only low-bit quantization cores for decoder LMs: group-wise grids (MatMulNBits layout), GPTQ
error-compensating rounding, salience-driven group-wise mixed widths, low-rank error compensation.

Pure numpy/torch library functions over one ``(K, N)`` weight and its layer-local Hessian; passes and
benchmarks compose them.
"""
