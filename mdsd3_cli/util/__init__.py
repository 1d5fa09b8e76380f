"""Helpers that know nothing of the method: atomic files, background file writing, an ordered thread map,
progress bars, image decoding, devices and stop signals."""
