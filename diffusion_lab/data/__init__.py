"""Data: datasets (digits, CIFAR-10, image folders), the resumable batch loader, image helpers.
Importing the package registers the datasets in ``DATASETS``."""
from . import datasets  # noqa: F401  (registers the datasets)
