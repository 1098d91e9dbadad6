"""Evaluation: FID through clean-fid with its noise floor, download-free feature extractors, FID during training,
pictures, comparing runs, and the metric check."""
