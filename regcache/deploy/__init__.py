"""Real integer inference of a calibrated encoder (the kernels' interface: :mod:`regcache.deploy.kernels`)."""
