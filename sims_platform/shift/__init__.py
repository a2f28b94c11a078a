"""Distribution shifting (paper Sec. on fairness): select the aux set so SIMS guidance moves the class histogram
toward a target; the selection math, the classifiers, and the target-reweighted reference."""
