"""lazyfs: one stargz / eStargz layer as a lazy, verified, read-only filesystem.

Knows nothing of containerd. (Filled in by the lazy-pulling issues.)
"""
