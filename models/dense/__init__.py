"""Dense alignment of small in-the-wild collections onto a learned canonical grid (after ASIC,
Gupta et al., ICCV 2023). See docs/dense.md.
"""
