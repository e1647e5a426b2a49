"""Coadds: the output grid, fast flux-conserving resampling, incremental and final stacks.

The flow for one (target, filter) over a night::

    first good frame ──► make_grid (fixed for the night, stored as JSON / header)
    every frame      ──► resample onto the grid ──► Accumulator.add ──► write
                         (quick-look coadd: the file is the state; cost constant in k)
    end of night     ──► final_coadd (outlier-rejected, in chunks of output rows)

Conventions
-----------
- Pixels are 0-based in code (``array[y, x]``, the centre of the first pixel
  is (0, 0)); FITS headers (CRPIX) are 1-based.
- A bounding box ``(y0, y1, x0, x1)`` is a half-open slice of grid pixels:
  ``grid_array[y0:y1, x0:x1]``.
- Data are in electrons per pixel of the image they live on; resampling
  multiplies by the pixel-area ratio so fluxes (sums over pixels) are kept.
- A member's weight is a scalar, ``w = 1 / (FLXSCALE**2 * SKYNOISE**2)``, and
  its data enter the stack multiplied by FLXSCALE, so a coadd's SCI is a
  weighted mean in the units of the photometric reference, and its MAGZP is
  the reference zero point.

Coadd file (``coadd_<TARGET>_<FILTER>.fits``)::

    PRIMARY   no data; the keywords SWarp writes (:func:`coadd_keywords`: EXPTIME
              total, NCOMBINE, DATE-OBS/DATE-BEG/DATE-END, MJD-OBS/MJD-MID/MJD-END,
              effective GAIN, SATURATE), TELESCOP/INSTRUME/FILTER/OBJECT of the
              first member, STACKTYP, MAGZP (+ header_extra); all also in SCI
    SCI       float32, weighted mean (reference electrons per grid pixel);
              NaN where no frame contributes (WHT = 0); the grid WCS
    WHT       float32, sum of the weights of the frames used at each pixel
    EXP       float32, exposure map (s): sum of the exposure times used
    NCOV      int16, number of frames used at each pixel
    MEMBERS   table: member, flxscale, skynoise, exptime, weight, mjdobs, saturate

NCOV is an addition to the product contract (SCI, WHT, EXP): the per-pixel
frame count is part of the accumulator's state, and the file is that state.

Where the code is (this module only gathers the public names)::

    coadd/grid.py        CoaddGrid, make_grid, grown_grid, coadd_filename
    coadd/resample.py    the input-to-grid mapping, frame_bbox, resample, resample_frame
    coadd/accumulate.py  Member, member_weight, coadd_keywords, Accumulator, write_coadd
    coadd/final.py       FinalMember, final_members, final_coadd (outlier rejection)
    coadd/catalogue.py   coadd_catalog, write_catalog (catalogues of coadd files)
"""

from photowatch.coadd.accumulate import (
    COADD_EXTENSIONS,
    IDENTITY_KEYS,
    Accumulator,
    Member,
    coadd_keywords,
    identity,
    member_facts,
    member_weight,
    members_table,
    write_coadd,
)
from photowatch.coadd.final import FinalMember, final_coadd, final_members
from photowatch.coadd.grid import CoaddGrid, coadd_filename, grown_grid, make_grid
from photowatch.coadd.resample import Resampled, frame_bbox, resample, resample_frame

__all__ = ["COADD_EXTENSIONS", "IDENTITY_KEYS", "Accumulator", "CoaddGrid", "FinalMember",
           "Member", "Resampled", "coadd_filename", "coadd_keywords", "final_coadd",
           "final_members", "frame_bbox", "grown_grid", "identity", "make_grid",
           "member_facts", "member_weight", "members_table", "resample", "resample_frame",
           "write_coadd"]
