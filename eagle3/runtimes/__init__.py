"""The target's runtimes: the reference PyTorch model, its CPU layouts, eagle3's native kernels and OpenVINO."""
