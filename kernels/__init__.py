"""Triton kernels of ign_fast (installed as ign_fast.kernels). Without a GPU they run only under
TRITON_INTERPRET=1; import them lazily so ign_fast never needs triton."""
