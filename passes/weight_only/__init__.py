"""Weight-only low-bit quantization cores for decoder LMs: group-wise grids (MatMulNBits layout), GPTQ
error-compensating rounding, salience-driven group-wise mixed widths, low-rank error compensation.

Pure numpy/torch library functions over one ``(K, N)`` weight and its layer-local Hessian; passes and
benchmarks compose them. ``rewrite`` holds the graph edits ``materialize`` runs for weight-only layers
(ORT's MatMulNBits quantizer for MatMul/Gemm, blocked DequantizeLinear for Conv).
"""
