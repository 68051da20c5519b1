"""The parts of ``make gpu-check`` (``benchmarks.gpu_check`` drives them): one module a part, each run in a
process of its own as ``python -m benchmarks.gpu.<part> <size> <work dir> <results dir>``."""
