"""The test rig: a real writing guest on a real libvirtd, and the checks on it.

Used by the host tests, by `make demo` and by the benchmarks under bench/.
"""
