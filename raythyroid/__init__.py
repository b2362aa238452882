"""raythyroid: thyroid nodule segmentation in ultrasound as Ray jobs."""

__version__ = "0.1.0"
