"""crfs snapshotter: containerd's Snapshots API over gRPC.

This package speaks containerd and manages snapshot metadata and directories;
it never reads layer bytes (that is lazyfs's job).
"""
