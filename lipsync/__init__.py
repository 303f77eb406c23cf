"""Shared library of the lip-sync toolkit: devices, video/ffmpeg I/O, data, training pieces."""
