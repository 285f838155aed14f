"""Custom MindSpore kernels (C++ compiled at first use, cached): see ``cpu_kernels``."""
