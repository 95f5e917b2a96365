"""Libraries virtfreeze carries because Debian does not ship them.

mfusepy.py is mfusepy 3.1.1 (https://github.com/mxmlnkn/mfusepy, ISC license, see LICENSE):
libfuse3 bindings through ctypes, for the block-device views (device_view.py). Unchanged; to update,
replace the file with a newer release's and run the block-device tests.
"""
