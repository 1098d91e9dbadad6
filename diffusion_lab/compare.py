"""`python -m diffusion_lab.compare SWEEP_DIR [MORE_DIRS...]`: tables and plots for a set of runs
(the library is `evaluation.compare`)."""
from .evaluation.compare import main

if __name__ == "__main__":
    main()
