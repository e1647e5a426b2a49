"""The science stages: pure functions on an in-memory :class:`~photowatch.core.frame.Frame`.

Each module holds one step of PhotoPipe's autoproc, in order: prepare,
flatten, mastersky, skysub, cosmics, astrometry, zeropoint. A stage takes the
frame first and keyword-only explicit inputs (masters, its settings section,
the catalogue), and returns a new frame plus, where it measures something, a
frozen result. Stages import nothing from the store, the watcher or the CLI.
"""
