"""Tests of the stargz / eStargz format (lazyfs.stargz), its CLI and interoperability with the Go reference."""
