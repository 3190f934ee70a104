"""Triton backend of kdkernels: ``kernels.py`` holds the @triton.jit kernels, ``launch.py`` the
launcher implementing the backend contract of ``kdkernels.backends``, ``aot.py`` the ahead-of-time
compile check for sm_80 / sm_90."""
