"""The photos mini is trained on and the ones held out of its training, by name (scikit-image's sample data,
`examples/photos`, matplotlib's sample data). Plain names, no imports: scripts that only need the lists
(training, figures, the downstream check, the stand-in reference) read them here."""

HELD_OUT = ("chelsea", "coffee")
"""Never cropped for training: the figures and the downstream check test on them."""
COLOUR = ("astronaut", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "motorcycle")
GRAY = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel", "cell", "microaneurysms")
EXTRA = ("grace_hopper",)
"""Colour photos shipped with other installed packages (matplotlib's sample data)."""
