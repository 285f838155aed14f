"""Custom MindSpore kernels (C++ compiled at first use, cached): see ``bf16_matmul``."""
