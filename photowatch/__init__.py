"""photowatch: real-time imaging reduction for telescopes.

The real-time successor of PhotoPipe: a daemon watches the camera's data
directory, keeps calibration masters up to date as frames arrive, reduces each
science frame at once and grows quick-look coadds through the night; at dawn
``photowatch finalize`` turns the night into final products.
"""

__version__ = "0.1.0"
