"""The CUDA backend: the kernels of ``kernels/ctc.cu``, compiled at run time through NVRTC and launched on CuPy
arrays (:mod:`.loader` compiles and caches them, :mod:`.cupy_kernels` runs them)."""
