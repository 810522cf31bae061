"""Baton kernels: Triton kernels for the GPU runtime, each beside the plain-torch `*_reference` it is tested against."""
