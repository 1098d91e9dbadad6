"""`python -m diffusion_lab.metric_check`: is the offline digits FID a metric? A table of floors and ceilings
(the library is `evaluation.metric_check`)."""
from .evaluation.metric_check import main

if __name__ == "__main__":
    main()
